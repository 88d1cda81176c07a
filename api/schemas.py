"""Typed request and response bodies of the HTTP API (msgspec Structs; they are the OpenAPI schema).

Request bodies are *built* from the one request model (:mod:`sae_discover.request`): field names,
defaults and hard bounds come from there, tightened by the server's :class:`~api.settings.ApiSettings`.
A body that passes these types still goes through :func:`sae_discover.request.build_request` (the
cross-field rules: prompt xor text, tau xor tau_quantile), so CLI, batch and API validate alike.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from datetime import datetime
from typing import Annotated, Any, Literal, get_type_hints

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from api.settings import ApiSettings
from sae_discover.request import (
    FLOAT_BOUNDS,
    INT32_MAX,
    INT_BOUNDS,
    SCORE_MODE_ALIASES,
    STREAMS,
    TOKEN_PROXIES,
    DiscoverRequest,
)
from sae_discover.rerank import RANKING_FIELDS

ID_MAX = 200
# request-model fields the HTTP API refuses, and why (the API never reads server paths)
API_REFUSED = {"background_file": "this server does not read files; send the background as background_text"}
log = logging.getLogger("sae_discover.api")
MAX_LAYER = 10_000
StreamName = Literal[STREAMS]  # type: ignore[valid-type]
ScoreMode = Literal[tuple(SCORE_MODE_ALIASES)]  # type: ignore[valid-type]
TokenProxy = Literal[TOKEN_PROXIES]  # type: ignore[valid-type]

DESCRIPTIONS = {
    "model_id": "registry id of the model (GET /healthz lists them); paths and hub ids are refused",
    "sae_id": "registry id of the SAE source; paths are refused",
    "text": "text to analyze as is (give text or prompt, not both)",
    "prompt": "prompt to generate from (give text or prompt, not both)",
    "generate": "with prompt: analyze the prompt and the generated continuation",
    "gen_tokens": "maximum generated tokens (the default is capped by this server's limit)",
    "layers": "layers to analyze (default: the registry entry's default_layers)",
    "streams": f"hook points, TransformerLens names (default: {DiscoverRequest().streams})",
    "restrict_features": "score only these feature ids (default: all)",
    "topk_tokens_per_seq": "keep the K most informative tokens (token_proxy)",
    "return_top_x": "features returned (per (layer, stream) when merge_across_layers is false)",
    "score_mode": "ranking value",
    "min_coverage_pct": "coverage gate, a percentage 0-100 of analyzed tokens",
    "merge_across_layers": "one ranking over all hooks, else the top return_top_x per hook",
    "attach_examples": "attach top activating spans",
    "attach_proto_labels": "attach the best catalog label",
    "seed": "generation seed",
    "temperature": "sampling temperature; 0 is greedy",
    "top_p": "nucleus sampling mass",
    "token_proxy": "token informativeness for topk_tokens_per_seq: next-token entropy or activation norm",
    "tau": "global activity threshold instead of the calibrated per-feature P95",
    "tau_quantile": "another calibration quantile as threshold",
    "spans_per_feature": "evidence spans per feature",
    "span_window": "tokens each side of a span's peak",
    "background_text": "selectivity's background text (default: the calibration corpus mean)",
    "id": "echoed back in the response",
}


def _int(name: str, high: int | None = None) -> Any:
    low, top = INT_BOUNDS[name]
    return Annotated[int, Meta(ge=low, le=min(top, high) if high is not None else top, description=DESCRIPTIONS[name])]


def _float(name: str) -> Any:
    low, high = FLOAT_BOUNDS[name]
    return Annotated[float, Meta(ge=low, le=high, description=DESCRIPTIONS[name])]


def _bool(name: str) -> Any:
    return Annotated[bool, Meta(description=DESCRIPTIONS[name])]


def _field_types(settings: ApiSettings) -> dict[str, Any]:
    """The type (with bounds) of every field of the request model, under this server's limits."""
    def text(name: str) -> Any:
        return Annotated[str, Meta(min_length=1, max_length=settings.max_text_chars, pattern=r"\S",
                                   description=DESCRIPTIONS[name])] | None

    ident = Annotated[str, Meta(min_length=1, max_length=ID_MAX, pattern=r"\S")]
    layer = Annotated[int, Meta(ge=0, le=MAX_LAYER)]
    feature = Annotated[int, Meta(ge=0, le=INT32_MAX)]
    return {
        "model_id": Annotated[ident, Meta(description=DESCRIPTIONS["model_id"])],
        "sae_id": Annotated[ident, Meta(description=DESCRIPTIONS["sae_id"])],
        "text": text("text"),
        "prompt": text("prompt"),
        "background_text": text("background_text"),
        "generate": _bool("generate"),
        "gen_tokens": _int("gen_tokens", settings.max_gen_tokens),
        "layers": Annotated[list[layer], Meta(min_length=1, max_length=settings.max_layers,
                                              description=DESCRIPTIONS["layers"])] | None,
        "streams": Annotated[list[StreamName], Meta(min_length=1, max_length=len(STREAMS),
                                                    description=DESCRIPTIONS["streams"])],
        "restrict_features": Annotated[list[feature], Meta(max_length=settings.max_restrict_features,
                                                           description=DESCRIPTIONS["restrict_features"])],
        "topk_tokens_per_seq": _int("topk_tokens_per_seq"),
        "return_top_x": _int("return_top_x", settings.max_return_top_x),
        "score_mode": Annotated[ScoreMode, Meta(description=DESCRIPTIONS["score_mode"])],
        "min_coverage_pct": _float("min_coverage_pct"),
        "merge_across_layers": _bool("merge_across_layers"),
        "attach_examples": _bool("attach_examples"),
        "attach_proto_labels": _bool("attach_proto_labels"),
        "seed": _int("seed"),
        "temperature": _float("temperature"),
        "top_p": _float("top_p"),
        "token_proxy": Annotated[TokenProxy, Meta(description=DESCRIPTIONS["token_proxy"])],
        "tau": _float("tau") | None,
        "tau_quantile": _float("tau_quantile") | None,
        "spans_per_feature": _int("spans_per_feature"),
        "span_window": _int("span_window"),
        "id": Annotated[str, Meta(max_length=ID_MAX, description=DESCRIPTIONS["id"])] | None,
    }


def _struct(name: str, names: tuple[str, ...], settings: ApiSettings, doc: str) -> type[Struct]:
    types = _field_types(settings)
    missing = [n for n in names if n not in types and n not in API_REFUSED]
    if missing:  # a new request field needs a type here; until then the API refuses it (a test says so)
        log.warning("api.schemas has no type for request field(s) %s; the API refuses them", missing)
    names = tuple(n for n in names if n in types)
    defaults = {f.name: getattr(DiscoverRequest(), f.name) for f in fields(DiscoverRequest)}
    caps = {"gen_tokens": settings.max_gen_tokens, "return_top_x": settings.max_return_top_x}
    specs = []
    for n in names:
        default = defaults[n]
        if n in caps:  # a server limit below the request model's default caps the default too
            default = min(default, caps[n])
        if isinstance(default, list):
            default = msgspec.field(default_factory=lambda d=tuple(default): list(d))
        specs.append((n, types[n], default))
    struct = msgspec.defstruct(name, specs, kw_only=True, forbid_unknown_fields=True, module=__name__)
    struct.__doc__ = doc
    return struct


def discover_body(settings: ApiSettings) -> type[Struct]:
    """``POST /v1/sae/features/discover``: the seed's body (names and defaults of the request model)."""
    return _struct("DiscoverBody", tuple(f.name for f in fields(DiscoverRequest)), settings,
                   "The seed's discovery request. Give prompt or text. Unknown fields are refused.")


def rank_body(settings: ApiSettings) -> type[Struct]:
    """``POST /v1/runs/{run_id}/rank``: ranking options only (they never create a new run)."""
    return _struct("RankBody", RANKING_FIELDS, settings, "Ranking options for a stored run. Unknown fields are refused.")


def labels_body(settings: ApiSettings) -> type[Struct]:
    content = Annotated[str, Meta(min_length=1, max_length=settings.max_body_bytes,
                                  description="the label file's text (neuronpedia, csv)")]
    delphi_name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*_latent[0-9]+\.txt$", max_length=ID_MAX)]
    struct = msgspec.defstruct("LabelsImportBody", [
        ("sae_id", Annotated[str, Meta(min_length=1, max_length=ID_MAX, description=DESCRIPTIONS["sae_id"])]),
        ("format", Annotated[Literal["neuronpedia", "csv", "delphi"],
                             Meta(description="neuronpedia: JSONL export (modelId, layer, index, description); "
                                              "csv: header feature_id,label[,score,source,layer,stream]; "
                                              "delphi: explanation files, in files")]),
        ("content", content | None, None),
        ("files", Annotated[dict[delphi_name, Annotated[str, Meta(max_length=100_000)]],
                            Meta(max_length=1_000_000,
                                 description="delphi: file name (<module>_latent<N>.txt) → explanation")] | None, None),
        ("layer", Annotated[int, Meta(ge=0, le=MAX_LAYER, description="the hook the labels belong to (with stream); "
                                                                     "default: from the file")] | None, None),
        ("stream", StreamName | None, None),
    ], kw_only=True, forbid_unknown_fields=True, module=__name__)
    struct.__doc__ = "An AutoInterp label table, as content (never a server path)."
    return struct


# -- responses ------------------------------------------------------------------------------------

class ErrorBody(Struct, kw_only=True):
    """Every error: the status, ``<field>: <what was expected>``, and the field (null when none applies)."""

    status_code: int
    detail: str
    field: str | None = None


class Span(Struct, kw_only=True):
    text: str
    position: list[int]
    act: float


class Scores(Struct, kw_only=True):
    mean: float
    coverage: float
    max: float
    selectivity: float | None


class Feature(Struct, kw_only=True, omit_defaults=True):
    feature_id: int
    layer: int
    stream: str
    score: float
    scores: Scores
    proto_label: str | UnsetType | None = UNSET
    top_spans: list[Span] | UnsetType = UNSET


class Analyzed(Struct, kw_only=True):
    mode: str
    tokens: int
    layers: list[int]
    streams: list[str]
    total_tokens: int


class DiscoverResponse(Struct, kw_only=True, omit_defaults=True):
    """The seed's response, plus run_id, cached, threshold_source, normalization, analyzed and timings."""

    model_id: str
    sae_id: str
    run_id: str
    cached: bool
    analyzed: Analyzed
    score_mode: str
    threshold_source: str
    normalization: str
    features: list[Feature]
    warnings: list[str]
    timings: dict[str, float] | UnsetType = UNSET
    id: str | UnsetType = UNSET


class RunSummary(Struct, kw_only=True):
    """One row of the public ``v_runs`` view."""

    run_id: str
    model_id: str
    sae_id: str
    mode: str
    prompt: str | None
    text: str | None
    generate: bool
    gen_tokens: int | None
    seed: int | None
    created_at: datetime | None
    n_tokens: int
    n_kept: int
    layers: list[int]
    streams: list[str]


class RunPage(Struct, kw_only=True):
    runs: list[RunSummary]
    total: int
    limit: int
    offset: int


class RunSAE(Struct, kw_only=True):
    sae_id: str
    layer: int
    stream: str
    hook_name: str | None
    architecture: str | None
    d_in: int | None
    d_sae: int | None
    fingerprint: str


class RunDetail(RunSummary, kw_only=True):
    temperature: float | None
    top_p: float | None
    token_proxy: str | None
    topk_tokens_per_seq: int | None
    restrict_features: list[int]
    timings: dict[str, float]
    saes: list[RunSAE]


class LabelsImported(Struct, kw_only=True):
    imported: int
    hooks: list[list[int | str]]


Limits = msgspec.defstruct("Limits", [(name, hint) for name, hint in get_type_hints(ApiSettings).items()
                                       if name in ApiSettings().public()], kw_only=True, module=__name__)


class Health(Struct, kw_only=True):
    status: str
    models: list[str]
    saes: list[str]
    models_loaded: list[str]
    forward_runs: int
    in_flight: int
    limits: Limits  # type: ignore[valid-type]
