"""The discovery request — step 1 of the flow (prompt → hooks → codes → rows → SQL → JSON).

One definition of every option, composed of the parts that use them:

- :class:`Target` (here): model, SAE source, the prompt or text, and the hooks (layers × streams, or
  exact (layer, stream) pairs);
- :class:`ingest.options.RunOptions`: everything else that fixes a run's activations;
- :class:`catalog.ranking.RankOptions`: how stored activations are ranked (never creates a run).

Each field carries its help text and bounds as metadata and its choices as a ``Literal`` type;
:func:`options` reads them, and the CLI's flags (``cli.py``), the API's body schema
(``api/schemas.py``) and :func:`build_request`'s validation are all generated from that one list.
Validation turns any mapping (argparse namespace, JSON body, JSONL line) into a request or raises
:class:`RequestError` naming the field. Every number is bounded, so no request can overflow a DuckDB
INTEGER or ask for unbounded work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from catalog.ranking import SCORE_MODES, RankOptions
from ingest.options import STREAMS, RunOptions, Stream, parse_attribution_target
from sae_discover.errors import RequestError
from sae_discover.inputs import utf8_problem

SCORE_MODE_ALIASES = {**{mode: mode for mode in SCORE_MODES}, "mean_x_coverage": "mean×coverage",
                      "mean*coverage": "mean×coverage", "meanxcoverage": "mean×coverage"}
INT32_MAX = 2**31 - 1
MAX_LAYER = 10_000
ID_MAX_CHARS = 1000
ASCII_INT = re.compile(r"^\s*[+-]?[0-9]+\s*$")
MAX_TAGS = 64  # keys per request's tags
MAX_TAG_KEY = 100  # characters of a tag key
MAX_TAG_VALUE = 1000  # characters of a tag value


@dataclass
class Target:
    """What to analyze, with which model and SAEs, at which hooks (the seed's names)."""

    model_id: str = field(default="demo", metadata={
        "help": "registry id, local HF directory or hub id", "flag": "--model"})
    sae_id: str = field(default="demo", metadata={
        "help": "registry id or SAE folder (SAELens folder, or a folder of them, one per hook)", "flag": "--sae"})
    prompt: str | None = field(default=None, metadata={
        "help": "prompt to generate from (give prompt or text, not both)", "text": True})
    text: str | None = field(default=None, metadata={
        "help": "text to analyze as is (give prompt or text, not both)", "text": True})
    layers: list[int] | None = field(default=None, metadata={
        "help": "layers to analyze (default: the registry entry's default_layers, else 22)",
        "item_bounds": (0, MAX_LAYER)})
    streams: list[Stream] = field(default_factory=lambda: ["resid_pre"], metadata={
        "help": "hook points, TransformerLens names"})
    hooks: list[tuple[int, Stream]] | None = field(default=None, metadata={
        "help": "exactly these (layer, stream) pairs instead of layers × streams: LAYER:STREAM,... on the command "
                "line, [[layer, \"stream\"], ...] in JSON", "item_bounds": (0, MAX_LAYER)})
    background_text: str | None = field(default=None, metadata={
        "help": "selectivity's background text (default: the calibration corpus mean)", "text": True})
    background_file: str | None = field(default=None, metadata={
        "help": "selectivity's background: a file, one document per line", "text": True, "path": True})
    id: str | None = field(default=None, metadata={
        "help": "echoed back in the response and stored with the run as its batch_id (batch lines, API bodies)"})
    tags: dict[str, str | int | float | bool] | None = field(default=None, metadata={
        "help": f"labels stored with the run, not part of its id (the same prompt with other tags reuses the run "
                f"and merges them): KEY=VALUE,... on the command line, a flat JSON object of scalars in JSON "
                f"(at most {MAX_TAGS} keys of at most {MAX_TAG_KEY} characters)"})
    verify_top: int = field(default=0, metadata={
        "help": "ablate each of the top N returned features (and the top N by mean activation) and measure the "
                "true change of the attribution target", "bounds": (0, 100)})


@dataclass
class DiscoverRequest(RunOptions, RankOptions, Target):
    """The seed's body (names and defaults as it spells them) plus SPEC.md's settled extras."""

    def to_dict(self) -> dict[str, Any]:
        return {o.name: getattr(self, o.name) for o in options(DiscoverRequest)}


@dataclass(frozen=True)
class Option:
    """One user-facing field of a request part, as the front doors see it."""

    name: str
    kind: Literal["bool", "int", "float", "id", "text", "choice", "int_list", "choice_list", "hook_list", "list",
                  "tags"]
    default: Any
    help: str
    bounds: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a value (e.g. tau: "not given")
    flag: str = ""
    path: bool = False  # names a file on the caller's machine (the API refuses it)

    @property
    def shown_default(self) -> str:
        return "none" if self.default is None else str(self.default).lower() if isinstance(self.default, bool) \
            else " ".join(map(str, self.default)) if isinstance(self.default, list) else str(self.default)


def _kind(hint: Any, meta: dataclasses.Field) -> tuple[str, tuple[str, ...], bool]:
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is dict:
        return "tags", (), optional
    if origin is Literal:
        return "choice", tuple(args), optional
    if origin is list:
        (item,) = args
        if typing.get_origin(item) is tuple:  # (layer, stream) pairs
            return "hook_list", typing.get_args(typing.get_args(item)[1]), optional
        if typing.get_origin(item) is Literal:
            return "choice_list", typing.get_args(item), optional
        return ("int_list" if item is int else "list"), (), optional
    if hint is bool:
        return "bool", (), optional
    if hint is int:
        return "int", (), optional
    if hint is float:
        return "float", (), optional
    return ("text" if meta.metadata.get("text") else "id"), (), optional


def options(cls: type) -> list[Option]:
    """The user-facing fields of a request dataclass, in declaration order (internal fields skipped)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        kind, choices, optional = _kind(hints[f.name], f)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        bounds = f.metadata.get("bounds") or f.metadata.get("item_bounds")
        out.append(Option(f.name, kind, default, f.metadata.get("help", ""), bounds, choices, optional,
                          f.metadata.get("flag", f"--{f.name}"), bool(f.metadata.get("path"))))
    return out


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(o.name for o in options(cls))


FIELD_NAMES = field_names(DiscoverRequest)
RANKING_FIELDS = field_names(RankOptions)
OPTIONS = {o.name: o for o in options(DiscoverRequest)}
# re-ranking a stored run (``runs rank``, POST /v1/runs/{id}/rank): the ranking options, plus
# restrict_features as a filter over the run's stored rows (the run itself, and its id, stay as they are)
RERANK_OPTIONS = [*options(RankOptions), dataclasses.replace(
    OPTIONS["restrict_features"], help="rank only these feature ids among the run's stored rows (default: the "
                                       "run's own restrict set, else all)")]
RERANK_FIELDS = tuple(o.name for o in RERANK_OPTIONS)
MAX_TOPK = int(OPTIONS["topk_tokens_per_seq"].bounds[1])  # "keep every token" (backgrounds, calibration)


# -- checks of single values ----------------------------------------------------------------------

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
        if isinstance(value, str) and not ASCII_INT.match(value):  # int() also reads "٥" and "1_0"
            raise ValueError
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
    except (TypeError, ValueError, OverflowError):
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
        raise RequestError("score_mode", f"expected one of {', '.join(SCORE_MODES)} (or mean_x_coverage, "
                                         f"mean*coverage); got {value!r}")
    return mode


def parse_streams(value: Any) -> list[str]:
    """A stream name or a list of them, each one of STREAMS; duplicates dropped, order kept."""
    streams = [value] if isinstance(value, str) else value
    if not isinstance(streams, list | tuple) or not streams:
        raise RequestError("streams", f"expected a list of stream names from {', '.join(STREAMS)}")
    for s in streams:
        if s not in STREAMS:
            raise RequestError("streams", f"expected values in {', '.join(STREAMS)}, got {s!r}")
    return list(dict.fromkeys(streams))


def parse_layers(value: Any, max_layers: int) -> list[int]:
    """One layer or a non-empty list of them, each a non-negative integer; duplicates dropped, order kept
    (a layer listed twice would otherwise store its activations twice)."""
    layers = list(dict.fromkeys(_int_list("layers", value, 0, MAX_LAYER, max_layers)))
    if not layers:
        raise RequestError("layers", "expected at least one layer")
    return layers


def _hook(value: Any) -> tuple[int, str]:
    """One ``LAYER:STREAM`` string or ``[layer, stream]`` pair."""
    pair = value.split(":") if isinstance(value, str) else value
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise RequestError("hooks", f"expected LAYER:STREAM (e.g. 2:resid_pre) or [layer, \"stream\"], got {value!r}")
    layer = _int("hooks", pair[0], 0, MAX_LAYER)
    stream = pair[1].strip() if isinstance(pair[1], str) else pair[1]
    if stream not in STREAMS:
        raise RequestError("hooks", f"expected streams in {', '.join(STREAMS)}, got {stream!r}")
    return layer, stream


def parse_hooks(value: Any, max_layers: int) -> list[tuple[int, str]]:
    """(layer, stream) pairs from ``"2:resid_pre,3:mlp_out"``, a list of such strings (CLI words) or a
    list of ``[layer, stream]`` pairs (JSON); duplicates dropped, order kept. At most ``max_layers``
    pairs (each pair is one SAE, as each layer of ``layers`` is)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise RequestError("hooks", "expected at least one LAYER:STREAM pair")
    words = [w for item in items for w in (item.split(",") if isinstance(item, str) else [item])]
    hooks = list(dict.fromkeys(_hook(w) for w in words if not (isinstance(w, str) and not w.strip())))
    if not hooks:
        raise RequestError("hooks", "expected at least one LAYER:STREAM pair")
    if len(hooks) > max_layers:
        raise RequestError("hooks", f"expected at most {max_layers} pairs, got {len(hooks)}")
    return hooks


def tag_value(value: Any) -> str:
    """A tag's value as stored (text): strings as they are, numbers and booleans as their JSON text."""
    return value if isinstance(value, str) else json.dumps(value)


def _tag_words(value: Any) -> dict[str, Any]:
    """CLI words (``KEY=VALUE``, several per word with commas) as a mapping; a mapping as it is."""
    if isinstance(value, dict):
        return value
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
        raise RequestError("tags", f"expected an object of tag: value, or KEY=VALUE words, got {value!r}")
    out: dict[str, Any] = {}
    for word in (part for w in words for part in w.split(",") if part.strip()):
        key, sep, val = word.partition("=")
        if not sep:
            raise RequestError("tags", f"expected KEY=VALUE, got {word!r}")
        out[key.strip()] = val.strip()
    return out


def parse_tags(value: Any) -> dict[str, str]:
    """A flat mapping of tag key → scalar (string, number, boolean), checked and stored as text
    (:func:`tag_value`): at most :data:`MAX_TAGS` keys of 1 to :data:`MAX_TAG_KEY` characters."""
    tags = _tag_words(value)
    if len(tags) > MAX_TAGS:
        raise RequestError("tags", f"expected at most {MAX_TAGS} keys, got {len(tags)}")
    out = {}
    for key, val in tags.items():
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_TAG_KEY:
            raise RequestError("tags", f"expected keys of 1 to {MAX_TAG_KEY} characters, got {key!r}")
        if ":" in key or "=" in key:  # a tag filter (KEY=VALUE, KEY:VALUE) could never select it
            raise RequestError("tags", f"expected keys without ':' or '=' (they part key and value in tag filters), "
                                       f"got {key!r}")
        if not isinstance(val, str | int | float | bool) or (isinstance(val, float) and not math.isfinite(val)):
            raise RequestError("tags", f"{key}: expected a string, number or boolean, got {val!r}")
        text = tag_value(val)
        if len(text) > MAX_TAG_VALUE:
            raise RequestError("tags", f"{key}: expected a value of at most {MAX_TAG_VALUE} characters")
        out[key.strip()] = text
    return out


def parse_tag_filter(name: str, value: str, sep: str) -> tuple[str, str]:
    """One ``KEY<sep>VALUE`` tag filter (``runs list --tag domain=finance``, ``GET /v1/runs?tag=domain:finance``)."""
    key, found, val = str(value).partition(sep)
    if not found or not key.strip() or len(key) > MAX_TAG_KEY:
        raise RequestError(name, f"expected KEY{sep}VALUE, got {value!r}")
    return key.strip(), val.strip()


def check_restrict_features(features: list[int], saes: typing.Iterable[Any]) -> None:
    """Refuse a restrict set with a feature id beyond an SAE's dictionary (``saes``: objects with
    ``d_sae``, ``layer`` and ``stream``, as a run plan and a stored run have them)."""
    for info in saes:
        beyond = [f for f in features if f >= info.d_sae]
        if info.d_sae and beyond:
            raise RequestError("restrict_features", f"feature {beyond[0]} is beyond the {info.d_sae} features of "
                                                    f"the SAE for layer {info.layer} {info.stream}")


def _choice(opt: Option, value: Any) -> str:
    if opt.name == "score_mode":
        return parse_score_mode(value)
    if value not in opt.choices:
        raise RequestError(opt.name, f"expected one of {', '.join(opt.choices)}, got {value!r}")
    return value


def _text(name: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise RequestError(name, f"expected a string, got {value!r}")
    if len(value) > max_chars:
        raise RequestError(name, f"expected at most {max_chars} characters, got {len(value)}")
    if not value.strip():
        raise RequestError(name, "expected non-empty text")
    return value


def _ident(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > ID_MAX_CHARS:
        raise RequestError(name, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _strings(value: Any) -> list[str]:
    """Every string in a value (keys and items of a tags object or a list included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def check_value(opt: Option, value: Any, max_text_chars: int = 200_000, max_layers: int = 64) -> Any:
    """One option's value, converted (CLI strings included) and checked against its type and bounds."""
    problem = next((p for text in _strings(value) if (p := utf8_problem(text))), None)
    if problem:  # command-line bytes that are not UTF-8, or a JSON escape of half a character
        raise RequestError(opt.name, problem)
    if opt.kind == "bool":
        return parse_bool(opt.name, value)
    if opt.kind == "int":
        return _int(opt.name, value, *opt.bounds)  # type: ignore[misc]
    if opt.kind == "float":
        return _float(opt.name, value, *opt.bounds)  # type: ignore[misc]
    if opt.kind == "choice":
        return _choice(opt, value)
    if opt.kind == "choice_list":
        return parse_streams(value) if opt.name == "streams" else [_choice(opt, v) for v in value]
    if opt.kind == "int_list":
        if opt.name == "layers":
            return parse_layers(value, max_layers)
        return sorted(set(_int_list(opt.name, value, *opt.bounds, 1_000_000)))  # type: ignore[misc]
    if opt.kind == "text":
        return _text(opt.name, value, max_text_chars)
    if opt.kind == "hook_list":
        return parse_hooks(value, max_layers)
    if opt.kind == "tags":
        return parse_tags(value)
    if opt.kind == "list":
        raise TypeError(f"{opt.name}: a list of objects has its own parser")  # a bug, not a user error
    return _ident(opt.name, value)


def known_values(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The mapping without None values; a key outside ``names`` is refused, naming it."""
    if not isinstance(data, dict):
        raise RequestError("body", f"expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise RequestError(str(unknown[0]), f"unknown field; expected one of {', '.join(names)}")
    return {k: v for k, v in data.items() if v is not None}


def fill(target: object, cls: type, values: dict[str, Any], max_text_chars: int = 200_000, max_layers: int = 64,
         skip: tuple[str, ...] = ()) -> None:
    """Check every value present in ``values`` that is an option of ``cls`` and set it on ``target``."""
    for opt in options(cls):
        if opt.name in values and opt.name not in skip:
            setattr(target, opt.name, check_value(opt, values[opt.name], max_text_chars, max_layers))


def check_tau(req: object) -> None:
    if getattr(req, "tau", None) is not None and getattr(req, "tau_quantile", None) is not None:
        raise RequestError("tau", "give either tau or tau_quantile, not both")


def build_request(data: dict[str, Any], max_text_chars: int = 200_000, max_layers: int = 64) -> DiscoverRequest:
    """Validate a mapping of seed options into a :class:`DiscoverRequest` (unknown keys are refused)."""
    values = known_values(data, FIELD_NAMES)
    req = DiscoverRequest()
    fill(req, DiscoverRequest, values, max_text_chars, max_layers)
    if req.text is None and req.prompt is None:
        raise RequestError("prompt", "give a prompt (to generate from) or a text (to analyze); got neither")
    if req.text is not None and req.prompt is not None:
        raise RequestError("text", "give either prompt or text, not both")
    if req.background_text is not None and req.background_file is not None:  # one background mean, not two
        raise RequestError("background_file", "give either background_text or background_file, not both")
    if req.background == "batch" and (req.background_text is not None or req.background_file is not None):
        raise RequestError("background", "batch contrasts the prompts sent together; give it or background_text / "
                                         "background_file, not both")
    # streams at its default says nothing (the API's body always carries it): only other streams clash
    if req.hooks is not None and ("layers" in values or req.streams != OPTIONS["streams"].default):
        raise RequestError("hooks", "give hooks (exact layer:stream pairs) or layers/streams (their cross product), "
                                    "not both")
    check_tau(req)
    try:
        req.attribution_target = parse_attribution_target(req.attribution_target).canonical
    except ValueError as exc:
        raise RequestError("attribution_target", str(exc)) from None
    return req
