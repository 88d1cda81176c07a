"""The discovery request: the seed's option names and defaults, in one place for CLI, API and batch.

Validation turns any mapping (argparse namespace, JSON body, JSONL line) into a
:class:`DiscoverRequest` or raises :class:`RequestError` naming the field and what was expected.
Every number is bounded, so no request can overflow a DuckDB INTEGER or ask for unbounded work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCORE_MODE_ALIASES = {"mean×coverage": "mean×coverage", "mean_x_coverage": "mean×coverage",
                      "mean*coverage": "mean×coverage", "meanxcoverage": "mean×coverage",
                      "mean": "mean", "max": "max", "selectivity": "selectivity"}
STREAMS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
TOKEN_PROXIES = ("entropy", "norm")
INT32_MAX = 2**31 - 1


class RequestError(ValueError):
    """A request field with a bad value; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name

    @classmethod
    def of(cls, exc: ValueError, default_field: str) -> RequestError:
        """A lower layer's ``"<field>: <message>"`` error (CatalogError, ...) as a RequestError naming that field;
        a message without a field prefix is filed under ``default_field``."""
        if isinstance(exc, RequestError):
            return exc
        text = str(exc)
        name, _, message = text.partition(": ")
        return cls(name, message) if message and " " not in name else cls(default_field, text)


@dataclass
class DiscoverRequest:
    """The seed's body (names and defaults as it spells them) plus SPEC.md's settled extras."""

    model_id: str = "demo"
    sae_id: str = "demo"
    text: str | None = None
    prompt: str | None = None
    generate: bool = True
    gen_tokens: int = 128
    layers: list[int] | None = None  # None → the registry entry's default_layers, else [22] as in the seed
    streams: list[str] = field(default_factory=lambda: ["resid_pre"])
    restrict_features: list[int] = field(default_factory=list)
    topk_tokens_per_seq: int = 64
    return_top_x: int = 25
    score_mode: str = "mean×coverage"
    min_coverage_pct: float = 0.5
    merge_across_layers: bool = True
    attach_examples: bool = True
    attach_proto_labels: bool = True
    seed: int = 42
    # SPEC.md extras
    temperature: float = 1.0
    top_p: float = 1.0
    token_proxy: str = "entropy"
    tau: float | None = None
    tau_quantile: float | None = None
    spans_per_feature: int = 3
    span_window: int = 8
    background_text: str | None = None  # selectivity's background (default: the calibration mean)
    background_file: str | None = None  # CLI only: one document per line
    id: str | None = None  # batch lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(DiscoverRequest))

# (low, high) inclusive bounds; the server may tighten some (see api.settings)
INT_BOUNDS = {"gen_tokens": (0, 4096), "topk_tokens_per_seq": (1, 1_000_000), "return_top_x": (1, 100_000),
              "seed": (0, 2**63 - 1), "spans_per_feature": (0, 100), "span_window": (0, 1024)}
FLOAT_BOUNDS = {"min_coverage_pct": (0.0, 100.0), "temperature": (0.0, 100.0), "top_p": (1e-9, 1.0),
                "tau": (0.0, 1e30), "tau_quantile": (0.0, 1.0)}


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RequestError(name, f"expected true or false, got {value!r}")


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise RequestError(name, f"expected an integer, got {value!r}")
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (ValueError, OverflowError):
        raise RequestError(name, f"expected an integer, got {value!r}") from None
    if not low <= number <= high:
        raise RequestError(name, f"expected an integer in [{low}, {high}], got {number}")
    return number


def _float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise RequestError(name, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(name, f"expected a number, got {value!r}") from None
    if not low <= number <= high:  # also refuses NaN
        raise RequestError(name, f"expected a number in [{low:g}, {high:g}], got {value!r}")
    return number


def _int_list(name: str, value: Any, low: int, high: int, max_len: int) -> list[int]:
    if isinstance(value, int | str) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise RequestError(name, f"expected a list of integers, got {value!r}")
    if len(value) > max_len:
        raise RequestError(name, f"expected at most {max_len} values, got {len(value)}")
    return [_int(name, v, low, high) for v in value]


def parse_score_mode(value: Any) -> str:
    mode = SCORE_MODE_ALIASES.get(str(value).strip().lower().replace(" ", ""))
    if mode is None:
        raise RequestError("score_mode", f"expected one of mean, max, mean×coverage (or mean_x_coverage, "
                                         f"mean*coverage), selectivity; got {value!r}")
    return mode


def known_values(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The mapping without None values; a key outside ``names`` is refused, naming it."""
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; expected one of {', '.join(names)}")
    return {k: v for k, v in data.items() if v is not None}


def set_ids(target: object, values: dict[str, Any], names: tuple[str, ...]) -> None:
    """Copy id-like fields (non-empty strings up to 1000 characters, stripped) onto ``target``."""
    for name in names:
        if name in values:
            if not isinstance(values[name], str) or not values[name].strip() or len(values[name]) > 1000:
                raise RequestError(name, f"expected a non-empty string, got {values[name]!r}")
            setattr(target, name, values[name].strip())


def set_scalars(target: object, values: dict[str, Any], bools: tuple[str, ...], ints: dict[str, tuple[int, int]],
                floats: dict[str, tuple[float, float]]) -> None:
    """Copy booleans and bounded numbers present in ``values`` onto ``target``, each checked."""
    for name in bools:
        if name in values:
            setattr(target, name, parse_bool(name, values[name]))
    for name, (low, high) in ints.items():
        if name in values:
            setattr(target, name, _int(name, values[name], low, high))
    for name, (low, high) in floats.items():
        if name in values:
            setattr(target, name, _float(name, values[name], low, high))


def build_request(data: dict[str, Any], max_text_chars: int = 200_000, max_layers: int = 64) -> DiscoverRequest:
    """Validate a mapping of seed options into a :class:`DiscoverRequest` (unknown keys are refused)."""
    values = known_values(data, FIELD_NAMES)
    req = DiscoverRequest()
    set_ids(req, values, ("model_id", "sae_id", "id"))
    for name in ("text", "prompt", "background_text", "background_file"):
        if name in values:
            if not isinstance(values[name], str):
                raise RequestError(name, f"expected a string, got {values[name]!r}")
            if len(values[name]) > max_text_chars:
                raise RequestError(name, f"expected at most {max_text_chars} characters, got {len(values[name])}")
            if not values[name].strip():
                raise RequestError(name, "expected non-empty text")
            setattr(req, name, values[name])
    if req.text is None and req.prompt is None:
        raise RequestError("prompt", "give a prompt (to generate from) or a text (to analyze); got neither")
    if req.text is not None and req.prompt is not None:
        raise RequestError("text", "give either prompt or text, not both")
    set_scalars(req, values, ("generate", "merge_across_layers", "attach_examples", "attach_proto_labels"),
                INT_BOUNDS, FLOAT_BOUNDS)
    if "layers" in values:
        req.layers = parse_layers(values["layers"], max_layers)
    if "streams" in values:
        req.streams = parse_streams(values["streams"])
    if "restrict_features" in values:
        req.restrict_features = sorted(set(_int_list("restrict_features", values["restrict_features"], 0,
                                                     INT32_MAX, 1_000_000)))
    if "score_mode" in values:
        req.score_mode = parse_score_mode(values["score_mode"])
    set_proxy_and_tau(req, values)
    return req


def parse_layers(value: Any, max_layers: int) -> list[int]:
    """One layer or a non-empty list of them, each a non-negative integer."""
    layers = _int_list("layers", value, 0, 10_000, max_layers)
    if not layers:
        raise RequestError("layers", "expected at least one layer")
    return layers


def parse_streams(value: Any) -> list[str]:
    """A stream name or a list of them, each one of STREAMS; duplicates dropped, order kept."""
    streams = [value] if isinstance(value, str) else value
    if not isinstance(streams, list | tuple) or not streams:
        raise RequestError("streams", f"expected a list of stream names from {', '.join(STREAMS)}")
    for s in streams:
        if s not in STREAMS:
            raise RequestError("streams", f"expected values in {', '.join(STREAMS)}, got {s!r}")
    return list(dict.fromkeys(streams))


def set_proxy_and_tau(req: object, values: dict[str, Any]) -> None:
    """``token_proxy`` (checked) onto ``req``, and refuse tau together with tau_quantile."""
    if "token_proxy" in values:
        if values["token_proxy"] not in TOKEN_PROXIES:
            raise RequestError("token_proxy", f"expected one of {', '.join(TOKEN_PROXIES)}, "
                                              f"got {values['token_proxy']!r}")
        req.token_proxy = values["token_proxy"]  # type: ignore[attr-defined]
    if getattr(req, "tau", None) is not None and getattr(req, "tau_quantile", None) is not None:
        raise RequestError("tau", "give either tau or tau_quantile, not both")
