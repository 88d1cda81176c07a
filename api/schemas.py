"""Typed request and response bodies of the HTTP API (msgspec Structs; they are the OpenAPI schema).

Request bodies are *generated* from the one request model (:func:`sae_discover.request.options`):
field names, defaults, choices, help and hard bounds come from there, tightened by the server's
:class:`~api.settings.ApiSettings`. A body that passes these types still goes through
:func:`sae_discover.request.build_request` (the cross-field rules: prompt xor text, tau xor
tau_quantile), so CLI, batch and API validate alike. The discovery response is
:mod:`sae_discover.response`'s, shared with the CLI.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_type_hints

import msgspec
from msgspec import Meta, Struct

from api.settings import ApiSettings
from sae_discover.request import (
    ID_MAX_CHARS,
    MAX_LAYER,
    RERANK_OPTIONS,
    SCORE_MODE_ALIASES,
    DiscoverRequest,
    Option,
    options,
)
from sae_discover.response import DiscoverResponse

__all__ = ["API_REFUSED", "DiscoverResponse", "discover_body", "labels_body", "rank_body"]

ID_MAX = 200
# request-model fields the HTTP API refuses, and why (the API never reads server paths)
API_REFUSED = {o.name: f"this server does not read files; send the {o.name.replace('_file', '')} as "
                       f"{o.name.replace('_file', '_text')}" for o in options(DiscoverRequest) if o.path}
API_HELP = {  # what a field means for a client of this server
    "model_id": "registry id of the model (GET /healthz lists them); paths and hub ids are refused",
    "sae_id": "registry id of the SAE source; paths are refused",
}
STREAM_NAMES = next(o.choices for o in options(DiscoverRequest) if o.name == "streams")
StreamName = Literal[STREAM_NAMES]  # type: ignore[valid-type]


def _field_type(opt: Option, settings: ApiSettings) -> Any:
    """The msgspec type (bounds and description included) of one request option, under this server's limits."""
    doc = API_HELP.get(opt.name, opt.help)
    caps = {"gen_tokens": settings.max_gen_tokens, "return_top_x": settings.max_return_top_x}
    if opt.kind == "bool":
        kind: Any = Annotated[bool, Meta(description=doc)]
    elif opt.kind in ("int", "float"):
        low, high = opt.bounds  # type: ignore[misc]
        number = int if opt.kind == "int" else float
        kind = Annotated[number, Meta(ge=low, le=min(high, caps.get(opt.name, high)), description=doc)]
    elif opt.kind == "choice":
        names = tuple(SCORE_MODE_ALIASES) if opt.name == "score_mode" else opt.choices
        kind = Annotated[Literal[names], Meta(description=doc)]  # type: ignore[valid-type]
    elif opt.kind == "choice_list":
        kind = Annotated[list[Literal[opt.choices]], Meta(min_length=1, max_length=len(opt.choices),  # type: ignore[valid-type]
                                                          description=doc)]
    elif opt.kind == "int_list":
        low, high = opt.bounds  # type: ignore[misc]
        item = Annotated[int, Meta(ge=low, le=high)]
        limits = {"min_length": 1, "max_length": settings.max_layers} if opt.name == "layers" \
            else {"max_length": settings.max_restrict_features}
        kind = Annotated[list[item], Meta(**limits, description=doc)]  # type: ignore[valid-type]
    elif opt.kind == "hook_list":  # [[layer, "stream"], ...]
        low, high = opt.bounds  # type: ignore[misc]
        pair = tuple[Annotated[int, Meta(ge=low, le=high)], Literal[opt.choices]]  # type: ignore[valid-type]
        kind = Annotated[list[pair], Meta(min_length=1, max_length=settings.max_layers, description=doc)]  # type: ignore[valid-type]
    elif opt.kind == "text":
        kind = Annotated[str, Meta(min_length=1, max_length=settings.max_text_chars, pattern=r"\S", description=doc)]
    else:
        kind = Annotated[str, Meta(min_length=1, max_length=min(ID_MAX, ID_MAX_CHARS), pattern=r"\S",
                                   description=doc)]
    return kind | None if opt.optional or opt.default is None else kind


def _struct(name: str, opts: list[Option], settings: ApiSettings, doc: str) -> type[Struct]:
    caps = {"gen_tokens": settings.max_gen_tokens, "return_top_x": settings.max_return_top_x}
    specs = []
    for opt in opts:
        if opt.name in API_REFUSED:
            continue
        default = opt.default
        if opt.name in caps:  # a server limit below the request model's default caps the default too
            default = min(default, caps[opt.name])
        if isinstance(default, list):
            default = msgspec.field(default_factory=lambda d=tuple(default): list(d))
        specs.append((opt.name, _field_type(opt, settings), default))
    struct = msgspec.defstruct(name, specs, kw_only=True, forbid_unknown_fields=True, module=__name__)
    struct.__doc__ = doc
    return struct


def discover_body(settings: ApiSettings) -> type[Struct]:
    """``POST /v1/sae/features/discover``: the seed's body (names and defaults of the request model)."""
    return _struct("DiscoverBody", options(DiscoverRequest), settings,
                   "The seed's discovery request. Give prompt or text. Unknown fields are refused.")


def rank_body(settings: ApiSettings) -> type[Struct]:
    """``POST /v1/runs/{run_id}/rank``: ranking options only (they never create a new run)."""
    return _struct("RankBody", RERANK_OPTIONS, settings,
                   "Ranking options for a stored run (restrict_features filters its stored rows). "
                   "Unknown fields are refused.")


def labels_body(settings: ApiSettings) -> type[Struct]:
    content = Annotated[str, Meta(min_length=1, max_length=settings.max_body_bytes,
                                  description="the label file's text (neuronpedia, csv)")]
    delphi_name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*_latent[0-9]+\.txt$", max_length=ID_MAX)]
    struct = msgspec.defstruct("LabelsImportBody", [
        ("sae_id", Annotated[str, Meta(min_length=1, max_length=ID_MAX, description=API_HELP["sae_id"])]),
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
    analyzed_text: str
    continuation: str | None


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
