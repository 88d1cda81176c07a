"""The options that fix a run's activations: one definition, with defaults, help and bounds as metadata.

Torch-free: request parsing (CLI flags, the API schema, batch lines) derives its fields from
:class:`RunOptions` without loading a model stack. :class:`ingest.run.RunSpec` adds a run's input
and hooks to these options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Stream = Literal["resid_pre", "resid_post", "mlp_out", "attn_out"]  # TransformerLens hook names
STREAMS: tuple[str, ...] = get_args(Stream)
TokenProxy = Literal["entropy", "norm"]  # how informative a token is: next-token entropy or activation norm


@dataclass
class RunOptions:
    """Everything besides the input and hooks that fixes a run's activations (the ranking options are
    not here). Numbers carry their inclusive ``bounds``, lists their ``item_bounds``."""

    generate: bool = field(default=True, metadata={
        "help": "with prompt: analyze the prompt and the generated continuation"})
    gen_tokens: int = field(default=128, metadata={"help": "maximum generated tokens", "bounds": (0, 4096)})
    seed: int = field(default=42, metadata={"help": "generation seed", "bounds": (0, 2**63 - 1)})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature; 0 is greedy", "bounds": (0.0, 100.0)})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass", "bounds": (1e-9, 1.0)})
    token_proxy: TokenProxy = field(default="entropy", metadata={
        "help": "token informativeness for topk_tokens_per_seq: next-token entropy or activation norm"})
    topk_tokens_per_seq: int = field(default=64, metadata={
        "help": "keep the K most informative tokens (token_proxy)", "bounds": (1, 1_000_000)})
    restrict_features: list[int] = field(default_factory=list, metadata={
        "help": "score only these feature ids (default: all)", "item_bounds": (0, 2**31 - 1)})
