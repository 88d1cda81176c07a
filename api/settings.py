"""Server limits and options: defaults here, overridable by ``SAE_DISCOVER_API_<NAME>`` or ``serve`` flags.

The request model (:mod:`sae_discover.request`) holds the hard bounds every front door shares; these
settings can only tighten them for the server (a shared box should not accept a 4096-token generation
from every caller). The OpenAPI schema is built from these values, so it documents the server's limits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from sae_discover.request import OPTIONS

ENV_PREFIX = "SAE_DISCOVER_API_"
LIMIT_PREFIXES = ("max_", "request_", "sql_")  # settings that are serve flags (--max_gen_tokens ...) and public


@dataclass(frozen=True)
class ApiSettings:
    max_text_chars: int = 20_000  # prompt / text length, characters
    max_gen_tokens: int = 512  # generated tokens per request
    max_layers: int = 8  # layers per request
    max_return_top_x: int = 1_000  # features returned per request
    max_restrict_features: int = 65_536  # ids in restrict_features
    request_timeout_s: float = 300.0  # a discovery that takes longer answers 503 (the run finishes in the background)
    max_models: int = 2  # models kept loaded (least recently used is dropped); SAEs stay with their source
    max_body_bytes: int = 32_000_000  # request body (a label file import is the largest)
    max_page: int = 500  # runs per page of GET /v1/runs
    max_drift_prompts: int = 200  # prompts per POST /v1/drift
    enable_sql: bool = False  # POST /v1/sql answers only when on (serve --enable_sql; README, SQL over HTTP)
    max_sql_rows: int = 10_000  # rows per POST /v1/sql answer (its body's limit is at most this)
    max_sql_bytes: int = 64_000_000  # about the values' bytes per POST /v1/sql answer (rows past it are left out)
    sql_timeout_s: float = 30.0  # a POST /v1/sql query running longer is stopped (a 400 naming query)
    sql_memory_limit: str = "2GB"  # with enable_sql: DuckDB's memory limit for the whole served catalog
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None  # torch CPU threads (None: ingest.threads' rule by model size)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{f.name}: expected a positive number, got {value!r}")
        # the request model's hard bounds cap what a server may allow
        for limit, option in (("max_gen_tokens", "gen_tokens"), ("max_return_top_x", "return_top_x")):
            object.__setattr__(self, limit, min(getattr(self, limit), int(OPTIONS[option].bounds[1])))

    @classmethod
    def from_env(cls, **overrides) -> ApiSettings:
        """Defaults, then ``SAE_DISCOVER_API_<NAME>`` environment variables, then ``overrides`` (not None)."""
        settings = cls()
        values = {}
        for f in fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                default = getattr(settings, f.name)
                kind = int if default is None else type(default)  # the optional setting (threads) is an int
                try:
                    values[f.name] = _flag(raw) if kind is bool else kind(raw)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: expected a {kind.__name__}, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(settings, **values)

    @classmethod
    def limit_types(cls) -> dict[str, type]:
        """The limits a ``serve`` flag can set, with their types."""
        return {f.name: type(getattr(cls(), f.name)) for f in fields(cls) if f.name.startswith(LIMIT_PREFIXES)}

    def public(self) -> dict:
        """The limits a client may want to know (``GET /healthz``), and whether SQL over HTTP is on."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name.startswith(LIMIT_PREFIXES) or f.name == "enable_sql"}


def _flag(raw: str) -> bool:
    """An on/off environment variable (``SAE_DISCOVER_API_ENABLE_SQL=1``); anything else is refused."""
    text = raw.strip().lower()
    if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(raw)
    return text in ("1", "true", "yes", "on")
