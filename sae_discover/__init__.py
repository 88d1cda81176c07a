"""sae-discover: which SAE features did this model use on this prompt? (CLI front door.)"""

__version__ = "0.1.0"
