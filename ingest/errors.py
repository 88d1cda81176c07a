"""The errors ingest raises for what a user asked: each names the request field to change, as data.

Torch-free, so that light commands (and the front doors' error mapping) can import them without
loading a model stack. ``str(exc)`` is ``"<field>: <message>"``.
"""

from __future__ import annotations


class IngestError(ValueError):
    """A request that ingest cannot serve: ``field`` names the request field, ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelError(IngestError):
    """A model that cannot be loaded or hooked as asked."""


class SAEError(IngestError):
    """An SAE that cannot be loaded or used as asked."""
