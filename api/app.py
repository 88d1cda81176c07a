"""The Litestar app: thin routes over :class:`api.service.ApiService` (the CLI's functions).

    from api.app import create_app
    app = create_app("sae_catalog.duckdb", "sae-discover.toml")   # uvicorn api.app:app style, or
    python -m sae_discover serve --db sae_catalog.duckdb           # one worker process: it holds the catalog

Routes are built per app by the factories in :data:`ROUTES` (each takes the service and returns route
handlers), because request bodies are typed with this server's limits. To add a route, append a
factory (``create_app(..., extra_routes=[...])`` for one app, or ``ROUTES.append`` for all).

No ``from __future__ import annotations`` here: handler annotations name body types built at runtime.
"""

import functools
import importlib.util
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import msgspec
from litestar import Litestar, Request, Response, Router, get, post
from litestar._openapi.schema_generation.plugins import StructSchemaPlugin  # no public name; pinned in constraints.txt
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Operation, Schema
from litestar.params import JSONBody, Parameter
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

from api import schemas
from api.body import check_body
from api.errors import EXCEPTION_HANDLERS, ApiError, refuse_repeated_query
from api.report import report_routes
from api.service import ApiService, sql_csv, sql_json
from api.settings import ApiSettings
from catalog.runs import RUN_MODES
from sae_discover import __version__
from sae_discover.features import MAX_LIMIT
from sae_discover.request import INT32_MAX, MAX_LAYER

log = logging.getLogger("sae_discover.api")
RouteFactory = Callable[[ApiService], Sequence[ControllerRouterHandler]]


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=schemas.ErrorBody, description=description, generate_examples=False)


ERRORS = {400: _error("Bad input: detail says `<field>: <what was expected>`, field names it"),
          413: _error("Request body larger than the server accepts"),
          415: _error("Body not sent as JSON (Content-Type: application/json); field is content-type"),
          500: _error("Unexpected server error (details in the server log only)")}
NOT_FOUND = {404: _error("No such run in the catalog")}
READ_ONLY = {409: _error("The catalog is read-only (serve --read_only, or its file is not writable, or serve --store: "
                         "a pinned snapshot of a Delta store) and this request needs to write to it (a run not "
                         "stored yet, labels); field is db, or store")}
TIMEOUT = {503: _error("The run took longer than request_timeout_s; it completes in the background, "
                       "and the same request later answers from the catalog")}


async def in_thread(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Blocking work (forward passes, SQL) off the event loop; optionally bounded in time."""
    call = functools.partial(fn, *args)
    if timeout is None:
        return await anyio.to_thread.run_sync(call)
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    except TimeoutError:
        raise ApiError(503, "request", f"took longer than {timeout:g} s (request_timeout_s); the run finishes in the "
                                       "background and the same request will then answer from the catalog") from None


def discovery_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    body_type = schemas.discover_body(svc.settings)

    @post("/v1/sae/features/discover", status_code=200, tags=["discovery"],
          responses={**ERRORS, **READ_ONLY, **TIMEOUT},
          summary="Which SAE features did the model use on this prompt or text?")
    async def discover(data: JSONBody[body_type]) -> schemas.DiscoverResponse:  # type: ignore[valid-type]
        """The seed's request and response. A request whose activations are already in the catalog (same model,
        prompt/text, generation and SAE options) answers from it without the model: `cached: true`."""
        req = svc.build(msgspec.structs.asdict(data))
        result = await in_thread(svc.discover, req, timeout=svc.settings.request_timeout_s)
        return msgspec.convert(result, schemas.DiscoverResponse)

    return [discover]


def run_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    rank_type = schemas.rank_body(svc.settings)
    rank_runs_type = schemas.rank_runs_body(svc.settings)
    RunId = Annotated[str, Parameter(description="a run id (GET /v1/runs) or a unique prefix of at least 6 hex "
                                                 "characters", min_length=1, max_length=64)]
    Filter = Annotated[str | None, Parameter(min_length=1, max_length=schemas.ID_MAX)]

    @get("/v1/runs", sync_to_thread=True, tags=["runs"], responses=ERRORS, summary="Stored runs, newest first")
    def list_runs(limit: Annotated[int, Parameter(ge=1, le=svc.settings.max_page)] = 50,
                  offset: Annotated[int, Parameter(ge=0, le=INT32_MAX)] = 0,
                  model_id: Filter = None, sae_id: Filter = None,
                  mode: Annotated[Literal[RUN_MODES] | None, Parameter()] = None,  # type: ignore[valid-type]
                  tag: Annotated[list[str] | None, Parameter(
                      description="only runs tagged KEY:VALUE (repeat: all of them)", max_items=64)] = None,
                  batch_id: Annotated[list[str] | None, Parameter(
                      description="only runs whose batch_id (a batch line's or a body's id) is one of these (repeat: "
                                  "any of them)", max_items=64)] = None
                  ) -> schemas.RunPage:
        """Rows of the public `v_runs` view, filtered by model_id, sae_id, mode, tags and/or batch ids."""
        return msgspec.convert(svc.runs_page(limit, offset, model_id, sae_id, mode, tag or [], batch_id or []),
                               schemas.RunPage)

    @get("/v1/runs/{run_id:str}", sync_to_thread=True, tags=["runs"], responses={**ERRORS, **NOT_FOUND},
         summary="One stored run with its options and SAEs")
    def show_run(run_id: RunId) -> schemas.RunDetail:
        return msgspec.convert(svc.run_detail(run_id), schemas.RunDetail)

    @post("/v1/runs/{run_id:str}/rank", status_code=200, sync_to_thread=True, tags=["runs"],
          responses={**ERRORS, **NOT_FOUND}, summary="Rank a stored run again with other ranking options")
    def rank_run(run_id: RunId, data: JSONBody[rank_type]) -> schemas.DiscoverResponse:  # type: ignore[valid-type]
        """SQL over the stored activations; the model is not needed and no new run is created."""
        return msgspec.convert(svc.rank(run_id, msgspec.structs.asdict(data)), schemas.DiscoverResponse)

    @post("/v1/runs/rank", status_code=200, sync_to_thread=True, tags=["runs"], responses={**ERRORS, **NOT_FOUND},
          summary="Rank several stored runs together (ids and/or a selection), one response each")
    def rank_runs(data: JSONBody[rank_runs_type]) -> list[schemas.DiscoverResponse]:  # type: ignore[valid-type]
        """SQL over the stored activations, as for one run; `background: batch` contrasts each run with the
        others ranked with it (of its model and SAEs, leave-one-out). 404 for an unknown run id."""
        return msgspec.convert(svc.rank_runs(msgspec.structs.asdict(data)), list[schemas.DiscoverResponse])

    return [list_runs, show_run, rank_run, rank_runs]


def label_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    labels_type = schemas.labels_body(svc.settings)

    @post("/v1/labels/import", status_code=200, sync_to_thread=True, tags=["labels"],
          responses={**ERRORS, **READ_ONLY},
          summary="Import an AutoInterp label table (file content in the body)")
    def import_labels(data: JSONBody[labels_type]) -> schemas.LabelsImported:  # type: ignore[valid-type]
        """One transaction for the whole table; the hook of each label comes from layer/stream, else the file."""
        result = svc.import_labels(data.sae_id, data.format, data.content, data.files, data.layer, data.stream,
                                   data.score_type)
        return msgspec.convert(result, schemas.LabelsImported)

    return [import_labels]


def feature_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    unknown = {404: _error("The catalog holds no such SAE, hook or feature id (field: sae_id, layer, stream or "
                           "feature_id)")}

    @get("/v1/features/{sae_id:str}/{layer:str}/{stream:str}/{feature_id:str}", sync_to_thread=True,
         tags=["features"], responses={**ERRORS, **unknown}, summary="One feature across the stored runs")
    def show_feature(sae_id: Annotated[str, Parameter(description=schemas.API_HELP["sae_id"], min_length=1,
                                                      max_length=schemas.ID_MAX)],
                     layer: Annotated[int, Parameter(ge=0, le=MAX_LAYER)],
                     stream: Annotated[schemas.StreamName, Parameter()],  # type: ignore[valid-type]
                     feature_id: Annotated[int, Parameter(ge=0, le=INT32_MAX)],
                     limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT, description="top contexts and top runs "
                                                                                     "listed")] = 10,
                     model_id: Annotated[str | None, Parameter(
                         min_length=1, max_length=schemas.ID_MAX,
                         description="whose calibration gives the statistics (default: the SAE's newest, by any "
                                     "model)")] = None,
                     ) -> schemas.FeatureView:
        """Its labels (all sources), calibration statistics and histogram, its top contexts over the stored runs
        (its peak in each run, the peak token in `[[ ]]`), the runs where its mean was among the top 10 features
        of its SAE, and the tokens its decoder promotes and suppresses (from its lite label)."""
        return msgspec.convert(svc.feature(sae_id, layer, stream, feature_id, limit, model_id), schemas.FeatureView)

    return [show_feature]


def health_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    @get("/healthz", sync_to_thread=True, tags=["health"], responses={500: ERRORS[500]},
         summary="Liveness, registered ids, loaded models and the server's limits")
    def healthz() -> schemas.Health:
        return msgspec.convert(svc.health(), schemas.Health)

    return [healthz]


def drift_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    body_type = schemas.drift_body(svc.settings)

    @post("/v1/drift", status_code=200, tags=["drift"], responses={**ERRORS, **NOT_FOUND, **READ_ONLY, **TIMEOUT},
          summary="Cross-model drift: which features a fine-tune gained, lost or reweighted")
    async def drift(data: JSONBody[body_type]) -> schemas.DriftResponse:  # type: ignore[valid-type]
        """The CLI's drift request (`python -m sae_discover drift`): base and tuned model ids, sae_id, prompts
        (objects with prompt or text), or base_runs/tuned_runs as lists of run ids; layers, streams,
        score_mode, top_k and the flag thresholds. Missing runs are made; cached runs are reused."""
        report = await in_thread(svc.drift, msgspec.to_builtins(data), timeout=svc.settings.request_timeout_s)
        return msgspec.convert(report, schemas.DriftResponse)

    return [drift]


SQL_OFF = {403: _error("SQL over HTTP is off on this server (start it with serve --enable_sql); field is enable_sql")}
SQL_HELP = ("Read-only SQL over the catalog's public views, in the sandbox of `python -m sae_discover sql`: queries "
            "only (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, SET VARIABLE), in a read-only transaction, no file or "
            "network access, the server's memory and time limits (sql_memory_limit, sql_timeout_s), at most `limit` "
            "rows. JSON (`columns`, `rows`) or CSV (`format: \"csv\"` or `Accept: text/csv`). A refused or failed "
            "query is a 400 naming `query`.")


class CsvOrJsonOperation(Operation):
    """``POST /v1/sql``'s 200 is JSON or CSV (``format``, ``Accept``): the CSV form, with its row-count and
    truncation headers, added to the schema Litestar derives from the JSON return type."""

    def to_schema(self) -> dict[str, Any]:
        out = super().to_schema()
        ok = out.get("responses", {}).get("200")
        if isinstance(ok, dict):
            ok.setdefault("content", {})["text/csv"] = {"schema": {"type": "string"}}
            ok["headers"] = {name: {"description": text, "schema": {"type": "string"}} for name, text in (
                ("X-Row-Count", "CSV: the rows sent"), ("X-Truncated", "CSV: true when rows were left out"),
                ("X-Truncated-By", "CSV: rows or bytes: which cap left them out (empty when none)"))}
        return out


def sql_routes(svc: ApiService) -> list[ControllerRouterHandler]:
    if not svc.settings.enable_sql:  # no body is read: the answer is the same whatever is sent
        @post("/v1/sql", status_code=200, tags=["sql"], responses={**ERRORS, **SQL_OFF},  # (a body is checked first)
              summary="Read-only SQL over the catalog (off on this server: serve --enable_sql)")
        async def sql_off() -> None:
            svc.sql("", 0)  # raises the 403 naming enable_sql

        return [sql_off]
    body_type = schemas.sql_body(svc.settings)

    @post("/v1/sql", status_code=200, sync_to_thread=True, tags=["sql"], responses=ERRORS, description=SQL_HELP,
          operation_class=CsvOrJsonOperation,
          summary="Read-only SQL over the catalog (JSON columns and rows, or CSV)")
    def sql(data: JSONBody[body_type],  # type: ignore[valid-type]
            accept: Annotated[str | None, Parameter(header="accept", required=False)] = None,
            ) -> Response[schemas.SqlResult]:
        csv_asked = data.format == "csv" or (data.format is None and "text/csv" in (accept or "").lower())
        result = svc.sql(data.query, data.limit)
        if csv_asked:
            return Response(sql_csv(result), media_type="text/csv",  # type: ignore[return-value]
                            headers={"X-Row-Count": str(len(result.rows)), "X-Truncated": str(result.truncated).lower(),
                                     "X-Truncated-By": result.truncated_by or ""})
        return Response(msgspec.convert(sql_json(result, data.limit), schemas.SqlResult))

    return [sql]


# JSON Schema constraint keywords and the attributes of Litestar's Schema that hold them
CONSTRAINTS = {"minimum": "minimum", "maximum": "maximum", "exclusiveMinimum": "exclusive_minimum",
               "exclusiveMaximum": "exclusive_maximum", "minLength": "min_length", "maxLength": "max_length",
               "pattern": "pattern", "minItems": "min_items", "maxItems": "max_items",
               "minProperties": "min_properties", "maxProperties": "max_properties"}


def _complete(schema: Any, spec: dict) -> None:
    """Add to Litestar's ``schema`` of a field the constraints msgspec's own JSON schema ``spec`` of it
    states and Litestar drops: those of a nullable value (``tau >= 0 or null``), of list items
    (``layers[i] <= 10000``), of tuple members and of an object's keys."""
    if not isinstance(schema, Schema) or not isinstance(spec, dict):
        return
    for keyword, attr in CONSTRAINTS.items():
        if keyword in spec and getattr(schema, attr) is None:
            setattr(schema, attr, spec[keyword])
    _complete(schema.items, spec.get("items"))
    _complete(schema.property_names, spec.get("propertyNames"))
    for mine, theirs in zip(schema.prefix_items or [], spec.get("prefixItems") or [], strict=False):
        _complete(mine, theirs)
    members = spec.get("anyOf") or []
    for member in schema.one_of or schema.any_of or []:
        kind = getattr(getattr(member, "type", None), "value", None)
        _complete(member, next((m for m in members if m.get("type") == kind), {}))


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's msgspec Struct schema, plus ``additionalProperties: false`` for a Struct that refuses
    unknown fields (Litestar does not say so), and the constraints Litestar drops from nullable values,
    list items and tuple members (:func:`_complete`), so that the schema states what the server enforces."""

    def to_openapi_schema(self, field_definition: Any, schema_creator: Any) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        struct = field_definition.type_
        if getattr(msgspec.inspect.type_info(struct), "forbid_unknown_fields", False):
            schema.additional_properties = False
        (ref,), components = msgspec.json.schema_components([struct])
        spec = components.get(ref.get("$ref", "").rsplit("/", 1)[-1], {}).get("properties", {})
        for name, prop in (schema.properties or {}).items():
            _complete(prop, spec.get(name, {}))
        return schema


def refuse_unknown_query(request: Request) -> None:
    """Before every API route: a query parameter the route does not declare is a 400 naming it, as an
    unknown body field is (a misspelt ``limt=5`` must not silently give the default page). A handler that
    takes the request itself reads (and checks) its own query string."""
    params = request.route_handler.parsed_fn_signature.parameters
    if not request.query_params or "request" in params:
        return
    declared = {getattr(f.kwarg_definition, "query", None) or name: f for name, f in params.items()}
    unknown = sorted(set(request.query_params) - set(declared))
    if unknown:
        raise ApiError(400, unknown[0], "unknown query parameter; the request schema is at /schema/openapi.json")
    refuse_repeated_query(request, [name for name, f in declared.items() if not f.is_non_string_sequence])


async def check_request(request: Request) -> None:
    """Before every API route: its query string (:func:`refuse_unknown_query`), then its body, if it
    takes one (:func:`api.body.check_body`)."""
    refuse_unknown_query(request)
    await check_body(request)


def docs_config() -> tuple[OpenAPIConfig, list[ControllerRouterHandler]]:
    """The OpenAPI config with interactive docs (Swagger UI at /schema) that work offline: their assets
    come from the installed ``swagger-ui-py`` package, served under /schema/assets, never from a CDN."""
    spec = importlib.util.find_spec("swagger_ui")
    assets = Path(next(iter(spec.submodule_search_locations))) / "static" if spec and spec.submodule_search_locations \
        else None
    plugins, routes = [], []
    if assets is not None and (assets / "swagger-ui-bundle.js").is_file():
        base = "/schema/assets"
        plugins.append(SwaggerRenderPlugin(js_url=f"{base}/swagger-ui-bundle.js", css_url=f"{base}/swagger-ui.css",
                                           standalone_preset_js_url=f"{base}/swagger-ui-standalone-preset.js",
                                           path=["/", "/swagger"], favicon=""))
        routes.append(create_static_files_router(base, directories=[assets], include_in_schema=False))
    else:  # no offline assets: the JSON schema only, no page that would load scripts from a CDN
        log.warning("swagger-ui-py is not installed: no interactive docs under /schema (the schema is at "
                    "/schema/openapi.json)")
    config = OpenAPIConfig(title="sae-discover", version=__version__,
                           description="Which SAE features did a model use on a prompt? Discovery, stored runs, "
                                       "re-ranking, drift and label import over a DuckDB feature catalog.",
                           render_plugins=plugins or [JsonRenderPlugin(path=["/openapi.json", "/"])])
    return config, routes


ROUTES: list[RouteFactory] = [discovery_routes, run_routes, label_routes, drift_routes, feature_routes, sql_routes,
                              health_routes, report_routes]


def create_app(catalog_path: str | Path | None = None, registry_path: str | Path | None = None,
               settings: ApiSettings | None = None, extra_routes: Iterable[RouteFactory] = (),
               debug: bool = False, read_only: bool | None = None, store: str | None = None) -> Litestar:
    """The app over one catalog file, which this process then holds (DuckDB: one writer per file).
    ``read_only``: serve stored runs only (writes answer 409); None: only when the file is not writable.
    ``store``: serve a snapshot of this Delta store instead, pinned now (read-only: writes answer 409
    naming ``store``).

    Raises :class:`catalog.db.CatalogLocked` when another process holds the file.
    """
    svc = ApiService(catalog_path, registry_path, settings or ApiSettings.from_env(), read_only, store)
    handlers = [h for factory in [*ROUTES, *extra_routes] for h in factory(svc)]
    openapi_config, docs_routes = docs_config()
    app = Litestar(
        route_handlers=[Router("/", route_handlers=handlers, before_request=check_request), *docs_routes],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        on_shutdown=[lambda: svc.close()],  # Litestar passes the app to hooks that take arguments
        openapi_config=openapi_config,
        plugins=[StrictStructSchemaPlugin()],
        request_max_body_size=svc.settings.max_body_bytes,
        debug=debug,
    )
    app.state.service = svc
    return app
