"""Typed request and response bodies of the HTTP API (msgspec Structs; they are the OpenAPI schema).

Request bodies are *generated* from the one request model (:func:`sae_discover.request.options`):
field names, defaults, choices, help and hard bounds come from there, tightened by the server's
:class:`~api.settings.ApiSettings`. A body that passes these types still goes through
:func:`sae_discover.request.build_request` (the cross-field rules: prompt xor text, tau xor
tau_quantile), so CLI, batch and API validate alike. The discovery response is
:mod:`sae_discover.response`'s, shared with the CLI.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal, get_type_hints

import msgspec
from msgspec import Meta, Struct

from api.settings import ApiSettings
from catalog.runs import RUN_MODES
from sae_discover.drift.request import DriftRequest, DriftRunOptions
from sae_discover.request import (
    ID_MAX_CHARS,
    MAX_LAYER,
    MAX_TAG_KEY,
    MAX_TAGS,
    RERANK_OPTIONS,
    SCORE_MODE_ALIASES,
    DiscoverRequest,
    Option,
    options,
)
from sae_discover.response import DiscoverResponse

__all__ = ["API_REFUSED", "API_TYPE_HINTS", "DiscoverResponse", "discover_body", "drift_body", "labels_body",
           "rank_body", "rank_runs_body", "sql_body"]

ID_MAX = 200
# request-model fields the HTTP API refuses, and why (the API never reads server paths)
API_REFUSED = {o.name: f"this server does not read files; send the {o.name.replace('_file', '')} as "
                       f"{o.name.replace('_file', '_text')}" for o in options(DiscoverRequest) if o.path}
# what a field of the right name but the wrong JSON type means on this server (replaces msgspec's "Expected ...")
API_TYPE_HINTS = {name: ("str", "SQL filters are disabled here (a filter is code from a client); give a list of run ids")
                  for name in ("base_runs", "tuned_runs")}
API_HELP = {  # what a field means for a client of this server
    "model_id": "registry id of the model (GET /healthz lists them); paths and hub ids are refused",
    "sae_id": "registry id of the SAE source; paths are refused",
}
STREAM_NAMES = next(o.choices for o in options(DiscoverRequest) if o.name == "streams")
StreamName = Literal[STREAM_NAMES]  # type: ignore[valid-type]


def server_caps(settings: ApiSettings) -> dict[str, int]:
    """The request options this server caps below their own bounds (its limits), by name."""
    return {"gen_tokens": settings.max_gen_tokens, "return_top_x": settings.max_return_top_x}


def capped(opt: Option, settings: ApiSettings) -> Option:
    """``opt`` with its upper bound lowered to this server's limit, where it has one: the bound every
    route that reads the option checks (bodies through their schema, the report route's query itself)."""
    cap = server_caps(settings).get(opt.name)
    if cap is None or opt.bounds is None:
        return opt
    return dataclasses.replace(opt, bounds=(opt.bounds[0], min(opt.bounds[1], cap)))


def _field_type(opt: Option, settings: ApiSettings) -> Any:
    """The msgspec type (bounds and description included) of one request option, under this server's limits."""
    doc = API_HELP.get(opt.name, opt.help)
    opt = capped(opt, settings)
    if opt.kind == "bool":
        kind: Any = Annotated[bool, Meta(description=doc)]
    elif opt.kind in ("int", "float"):
        low, high = opt.bounds  # type: ignore[misc]
        number = int if opt.kind == "int" else float
        kind = Annotated[number, Meta(ge=low, le=high, description=doc)]
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
    elif opt.kind == "tags":  # a flat object of scalars (request.parse_tags checks it again)
        key = Annotated[str, Meta(min_length=1, max_length=MAX_TAG_KEY)]
        kind = Annotated[dict[key, str | int | float | bool], Meta(max_length=MAX_TAGS, description=doc)]  # type: ignore[valid-type]
    elif opt.kind == "text":
        kind = Annotated[str, Meta(min_length=1, max_length=settings.max_text_chars, pattern=r"\S", description=doc)]
    else:
        kind = Annotated[str, Meta(min_length=1, max_length=min(ID_MAX, ID_MAX_CHARS), pattern=r"\S",
                                   description=doc)]
    return kind | None if opt.optional or opt.default is None else kind


def _struct(name: str, opts: list[Option], settings: ApiSettings, doc: str, types: dict[str, Any] | None = None,
            extra: tuple = (), omit_defaults: bool = False) -> type[Struct]:
    """A body struct of request options (``types`` gives the type of options whose kind has no generic
    JSON form, e.g. lists of objects; ``extra`` adds (name, type, default) fields). Unknown fields are refused."""
    caps = server_caps(settings)
    types = types or {}
    specs = []
    for opt in opts:
        if opt.name in API_REFUSED:
            continue
        default = opt.default
        if opt.name in caps and default is not None:  # a server limit below the default caps the default too
            default = min(default, caps[opt.name])
        if isinstance(default, list):
            default = msgspec.field(default_factory=lambda d=tuple(default): list(d))
        kind = types.get(opt.name) or _field_type(opt, settings)
        specs.append((opt.name, kind | None if opt.name in types and default is None else kind, default))
    struct = msgspec.defstruct(name, [*specs, *extra], kw_only=True, forbid_unknown_fields=True,
                               omit_defaults=omit_defaults, module=__name__)
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


def _listed(item: Any, most: int, doc: str) -> tuple[Any, Any]:
    """An optional list field's type (at most ``most`` items) and its default, the empty list."""
    return Annotated[list[item], Meta(max_length=most, description=doc)], msgspec.field(default_factory=list)


def rank_runs_body(settings: ApiSettings) -> type[Struct]:
    """``POST /v1/runs/rank``: the runs to rank together (ids and/or the filters of ``GET /v1/runs``,
    plus batch ids) and ranking options."""
    word = Annotated[str, Meta(min_length=1, max_length=ID_MAX, pattern=r"\S")]
    run_id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\S")]
    most = settings.max_page
    selection = (
        ("run_ids", *_listed(run_id, most, "run ids (GET /v1/runs) or unique prefixes of at least 6 hex characters")),
        ("tag", *_listed(word, most, "also the runs tagged KEY:VALUE (repeat: all of them), as GET /v1/runs?tag=")),
        ("batch_id", *_listed(word, most, "also the runs whose batch_id (a batch line's or body's id) is one of these")),
        ("model_id", word | None, None), ("sae_id", word | None, None),
        ("mode", Literal[RUN_MODES] | None, None))  # type: ignore[valid-type]
    return _struct("RankRunsBody", RERANK_OPTIONS, settings,
                   "Stored runs ranked together (run_ids, and the runs the filters select; model_id, sae_id and mode "
                   "filter as GET /v1/runs does) with ranking options; background batch contrasts each run with the "
                   "others of its model and SAEs. Unknown fields are refused.", extra=selection)


RunIds = Annotated[list[Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\S")]], Meta(
    min_length=1, max_length=100_000, description="stored runs only: run ids (GET /v1/runs) or unique prefixes of at "
                                                  "least 6 hex characters; SQL filters are refused here")]


def drift_body(settings: ApiSettings) -> type[Struct]:
    """``POST /v1/drift``: the drift request model (:class:`~sae_discover.drift.request.DriftRequest`), with
    run ids only for base_runs/tuned_runs and each prompts item typed like discovery's prompt/text."""
    texts = [o for o in options(DiscoverRequest) if o.name in ("prompt", "text")]
    item = _struct("DriftPrompt", [*texts, *options(DriftRunOptions)], settings,
                   "One prompt of a drift report: prompt or text, an optional id, and run options for it.",
                   extra=(("id", Annotated[str | int, Meta(description="echoed in the report's prompts")] | None, None),),
                   omit_defaults=True)
    prompts = Annotated[list[item], Meta(min_length=1, max_length=settings.max_drift_prompts,  # type: ignore[valid-type]
                                         description="objects with prompt or text (+ optional id and run options)")]
    return _struct("DriftBody", options(DriftRequest), settings,
                   "A drift report: base + tuned + prompts (runs are made or reused), or base_runs + tuned_runs "
                   "(stored runs only). Unknown fields are refused.",
                   types={"prompts": prompts, "base_runs": RunIds, "tuned_runs": RunIds})


def labels_body(settings: ApiSettings) -> type[Struct]:
    content = Annotated[str, Meta(min_length=1, max_length=settings.max_body_bytes,
                                  description="the label file's text (neuronpedia, csv)")]
    delphi_name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*_latent[0-9]+\.txt$", max_length=ID_MAX)]
    struct = msgspec.defstruct("LabelsImportBody", [
        ("sae_id", Annotated[str, Meta(min_length=1, max_length=ID_MAX, description=API_HELP["sae_id"])]),
        ("format", Annotated[Literal["neuronpedia", "csv", "delphi"],
                             Meta(description="neuronpedia: JSONL export (modelId, layer, index, and description "
                                              "or explanations); "
                                              "csv: header feature_id,label[,score,source,layer,stream]; "
                                              "delphi: explanation files, in files")]),
        ("content", content | None, None),
        ("files", Annotated[dict[delphi_name, Annotated[str, Meta(max_length=100_000)]],
                            Meta(max_length=1_000_000,
                                 description="delphi: file name (<module>_latent<N>.txt) → explanation")] | None, None),
        ("layer", Annotated[int, Meta(ge=0, le=MAX_LAYER, description="the hook the labels belong to (with stream); "
                                                                     "default: from the file")] | None, None),
        ("stream", StreamName | None, None),
        ("score_type", Annotated[str, Meta(min_length=1, max_length=ID_MAX, description=(
            "neuronpedia: the score type (explanationScoreTypeName, e.g. eleuther_fuzz) whose values are a "
            "label's score; needed when explanations carry several"))] | None, None),
    ], kw_only=True, forbid_unknown_fields=True, module=__name__)
    struct.__doc__ = "An AutoInterp label table, as content (never a server path)."
    return struct


SQL_MAX_CHARS = 100_000  # characters of a POST /v1/sql query
SQL_DEFAULT_ROWS = 1_000


def sql_body(settings: ApiSettings) -> type[Struct]:
    """``POST /v1/sql``: one read-only query and how many rows of its result to send back."""
    struct = msgspec.defstruct("SqlBody", [
        ("query", Annotated[str, Meta(min_length=1, max_length=SQL_MAX_CHARS,
                                      description="read-only SQL over the catalog's public views (README, The catalog: "
                                                  "public SQL views); several statements: the last one's result")]),
        ("limit", Annotated[int, Meta(ge=1, le=settings.max_sql_rows,
                                      description="rows sent back at most (truncated says whether there were more; the "
                                                  "server's max_sql_bytes also caps an answer)")],
         min(SQL_DEFAULT_ROWS, settings.max_sql_rows)),
        ("format", Annotated[Literal["json", "csv"], Meta(description="json (columns, rows) or csv; default: csv when "
                                                                      "the Accept header asks for text/csv")] | None,
         None),
    ], kw_only=True, forbid_unknown_fields=True, module=__name__)
    struct.__doc__ = "A read-only SQL query (SQL over HTTP is on only on a server started with --enable_sql)."
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
    attribution_target: str | None = None  # none for runs without attributions; null where never recorded
    batch_id: str | None = None  # the id of the batch line / body that last asked for the run
    tags: dict[str, str] = {}  # merged over every request for the run (not part of its id)


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
    replaced: int  # earlier labels of the same source at those hooks, replaced by this import
    hooks: list[list[int | str]]


class DriftSide(Struct, kw_only=True):
    model_id: str | None
    model_ids: list[str]
    run_ids: list[str]


class DriftMetrics(Struct, kw_only=True):
    """Agreement of the two sides' top-K feature sets (one prompt, or all of them)."""

    n_features_base: int
    n_features_tuned: int
    n_top_both: int
    n_top_union: int
    jaccard: float | None
    spearman: float | None
    spearman_all: float | None
    n_gained: int
    n_lost: int
    n_shifted: int


class DriftOverall(DriftMetrics, kw_only=True):
    n_prompts: int


class DriftPromptMetrics(DriftMetrics, kw_only=True, omit_defaults=True):
    """One prompt's metrics; it carries prompt or text (the other is left out)."""

    index: int
    id: str | None
    mode: str
    prompt: str | None = None
    text: str | None = None
    base_run_ids: list[str]
    tuned_run_ids: list[str]


class DriftFeature(Struct, kw_only=True):
    feature_id: int
    layer: int
    stream: str
    flag: str | None
    score_base: float
    score_tuned: float
    score_change: float
    rank_base: int | None
    rank_tuned: int | None
    rank_change: int | None
    in_top_k_base: bool
    in_top_k_tuned: bool
    prompts_base: int
    prompts_tuned: int
    proto_label: str | None


class DriftFlagged(Struct, kw_only=True):
    gained: list[DriftFeature]
    lost: list[DriftFeature]
    shifted: list[DriftFeature]


class DriftThresholds(Struct, kw_only=True):
    min_score_change: float
    min_relative_change: float
    min_rank_shift: int


class DriftUnpaired(Struct, kw_only=True):
    side: str
    run_id: str
    mode: str


class DriftIngested(Struct, kw_only=True):
    new_runs: int
    cached_runs: int


class DriftResponse(Struct, kw_only=True):
    """A drift report (README, "Drift reports"): the CLI's ``drift`` JSON."""

    base: DriftSide
    tuned: DriftSide
    sae_id: str
    hooks: list[tuple[int, str]]
    score_mode: str
    min_coverage_pct: float
    threshold_source: str
    normalization: str
    calibration_ids: list[int]  # the calibrations that gave τ and normalization (empty: none)
    top_k: int
    thresholds: DriftThresholds
    overall: DriftOverall
    prompts: list[DriftPromptMetrics]
    features: list[DriftFeature]
    flagged: DriftFlagged
    unpaired: list[DriftUnpaired]
    ingested: DriftIngested | None
    warnings: list[str]
    timings: dict[str, float]


class FeatureLabel(Struct, kw_only=True):
    label: str
    source: str  # neuronpedia | delphi | csv | lite | ...
    score: float | None
    calibration_id: int | None = None  # a lite label's calibration (its model's tokens); None when imported


class HistogramBucket(Struct, kw_only=True):
    lo: float
    hi: float
    count: int


class FeatureCalibration(Struct, kw_only=True):
    """The feature's statistics in the newest calibration of its SAE, and the histogram of its nonzero
    activations there (buckets over (0, max]; ``zeros``: the calibration tokens where it was 0)."""

    calibration_id: int
    model_id: str  # the model whose activations on the corpus gave these statistics
    corpus: str | None
    corpus_hash: str | None
    n_tokens: int | None
    density: float
    mean: float
    max: float
    p95: float
    p95_all: float
    zeros: int
    buckets: list[HistogramBucket]


class FeatureContext(Struct, kw_only=True):
    """The feature's peak in one stored run (a row of ``v_top_contexts``) as an evidence span."""

    rank: int
    run_id: str
    token: str | None
    n_fired: int
    text: str
    position: list[int]  # [start, end) of the span
    act: float
    marked: str  # the span with the peak token in [[ ]]
    peak: int  # the peak token's position
    tags: dict[str, str]


class FeatureTopRun(Struct, kw_only=True):
    run_id: str
    rank: int  # of the feature's mean among the features of its SAE in the run
    mean: float
    max: float
    tags: dict[str, str]


class FeatureView(Struct, kw_only=True):
    """One feature across the catalog (``feature show``)."""

    sae_id: str
    layer: int
    stream: str
    feature_id: int
    labels: list[FeatureLabel]
    calibration: FeatureCalibration | None
    n_runs: int
    top_contexts: list[FeatureContext]
    top_runs: list[FeatureTopRun]
    n_top_runs: int
    top_run_rank: int
    fires_on: list[str] | None
    promotes: list[str] | None
    suppresses: list[str] | None


Limits = msgspec.defstruct("Limits", [(name, hint) for name, hint in get_type_hints(ApiSettings).items()
                                       if name in ApiSettings().public()], kw_only=True, module=__name__)


class SqlColumn(Struct, kw_only=True):
    name: str
    type: str  # DuckDB's type name (INTEGER, VARCHAR, DOUBLE[], STRUCT(...), TIMESTAMP WITH TIME ZONE, ...)


class SqlResult(Struct, kw_only=True):
    """A query's result, Arrow-friendly: typed columns and rows in their order (``pa.Table.from_pylist`` or
    ``pandas.DataFrame(rows, columns=[c["name"] for c in columns])``). Dates, times, decimals, UUIDs, intervals
    and blobs come as text, NaN as null; a statement without a result set gives no columns and no rows."""

    columns: list[SqlColumn]
    rows: list[list[Any]]
    row_count: int
    truncated: bool  # rows were left out: more than limit, or past the server's max_sql_bytes
    truncated_by: Literal["rows", "bytes"] | None  # which cap left them out (rows: limit)
    limit: int


class StoreSnapshot(Struct, kw_only=True):
    name: str  # the Delta store served (serve --store), by its URI's last part: the server's paths are not told
    runs_version: int  # the version of its runs table pinned when the server started


class Health(Struct, kw_only=True):
    status: str
    models: list[str]
    saes: list[str]
    models_loaded: list[str]
    forward_runs: int
    in_flight: int
    read_only: bool  # the catalog is open read-only: stored runs only (serve --read_only, or not writable)
    limits: Limits  # type: ignore[valid-type]
    store: StoreSnapshot | None = None  # serve --store: the snapshot served (null for a catalog file)
