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
TokenProxy = Literal["auto", "entropy", "norm"]  # how informative a token is (auto: :func:`resolve_token_proxy`)


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
    token_proxy: TokenProxy = field(default="auto", metadata={
        "help": "token informativeness for topk_tokens_per_seq: next-token entropy, activation norm, or auto "
                "(entropy where the run computes the logits anyway: prompt+gen or attribution; else norm)"})
    topk_tokens_per_seq: int = field(default=64, metadata={
        "help": "keep the K most informative tokens (token_proxy)", "bounds": (1, 1_000_000)})
    restrict_features: list[int] = field(default_factory=list, metadata={
        "help": "score only these feature ids (default: all)", "item_bounds": (0, 2**31 - 1)})
    attribution_target: str = field(default="none", metadata={
        "help": "the metric M whose gradient attributes each (token, feature): none, continuation (log-prob of the "
                "generated tokens), next_tokens (log-prob of each next token of the text), token:<text> (log-prob "
                "of one token at the last position), logit_diff:<a>|<b> (logit a - logit b at the last position)"})


def resolve_token_proxy(options: RunOptions, has_text: bool) -> TokenProxy:
    """The proxy a run uses: ``auto`` becomes ``entropy`` where the logits come free — prompt+gen (the
    generation passes compute them) or an attribution target (its forward runs to the logits) — and
    ``norm`` otherwise: in text mode the entropy needs every block after the last hook and the
    unembedding, which costs more than the encode the filter saves (README, Performance). Resolved
    before the run id is hashed, so ``auto`` names the same run as the proxy it stands for."""
    if options.token_proxy != "auto":
        return options.token_proxy
    generating = not has_text and options.generate and options.gen_tokens > 0
    attributing = options.attribution_target.strip().lower() != "none"
    return "entropy" if generating or attributing else "norm"


ATTRIBUTION_KINDS = ("none", "continuation", "next_tokens", "token", "logit_diff")


@dataclass(frozen=True)
class AttributionTarget:
    """A parsed ``attribution_target``: its kind and, for ``token`` / ``logit_diff``, the token texts."""

    kind: str
    texts: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def canonical(self) -> str:
        """The one spelling of this target (what the run id hashes)."""
        if self.kind == "token":
            return f"token:{self.texts[0]}"
        if self.kind == "logit_diff":
            return f"logit_diff:{self.texts[0]}|{self.texts[1]}"
        return self.kind


def parse_attribution_target(value: str) -> AttributionTarget:
    """``none``, ``continuation``, ``next_tokens``, ``token:<text>`` or ``logit_diff:<a>|<b>`` (the texts
    verbatim: ``token: Paris`` means the token " Paris"). Raises ValueError with the reason; callers
    name the field. Whether each text is one token needs the tokenizer (:mod:`ingest.attribution`)."""
    kind, sep, rest = value.partition(":")
    kind = kind.strip().lower()
    if kind in ("none", "continuation", "next_tokens") and not sep:
        return AttributionTarget(kind)
    if kind == "token" and sep:
        if not rest:
            raise ValueError("token:<text> needs the token's text after the colon")
        return AttributionTarget(kind, (rest,))
    if kind == "logit_diff" and sep:
        a, bar, b = rest.partition("|")
        if not bar or not a or not b:
            raise ValueError(f"expected logit_diff:<a>|<b> with two token texts, got {value!r}")
        return AttributionTarget(kind, (a, b))
    raise ValueError(f"expected none, continuation, next_tokens, token:<text> or logit_diff:<a>|<b>, got {value!r}")
