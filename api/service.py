"""What the routes call: the CLI's functions (Discovery, rerank, label import) under the server's rules.

- registry ids only (``Discovery(..., allow_paths=False)``); bodies validated by the one request model;
- models loaded once and kept, at most ``max_models`` (least recently used dropped);
- forward passes serialised (Discovery's lock), identical requests coalesced (the second one waits
  and reads the first one's run from the catalog), catalog writes through the catalog's writer lock;
- reads concurrent: one DuckDB cursor per call (``Catalog.raw()``). No SQL here: it lives in ``catalog``;
- ``POST /v1/sql`` (only with ``enable_sql``): the client's query through the ``sql`` command's sandbox
  (:func:`catalog.sandbox.run_query`) on a new cursor of the served catalog, which was locked down once
  when it was opened (:mod:`catalog.sandbox` says why that way).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from api.errors import ApiError
from api.settings import ApiSettings
from catalog import runs, sandbox
from catalog.db import Catalog, CatalogError
from catalog.errors import LabelFileError, UnknownFeature, UnknownRun
from catalog.labels import DELPHI_NAME
from sae_discover.drift import build_drift_request, drift_report
from sae_discover.errors import RequestError
from sae_discover.features import show_feature
from sae_discover.registry import Registry
from sae_discover.request import RANKING_FIELDS, DiscoverRequest, build_request, parse_tag_filter
from sae_discover.service import Discovery
from sae_discover.stored import rerank, rerank_runs, select_runs

# the fields of POST /v1/runs/rank that choose runs (the others are ranking options)
RANK_SELECTION = ("run_ids", "tag", "batch_id", "model_id", "sae_id", "mode")


class KeyedLocks:
    """One lock per key, alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        with self._guard:
            return sum(count for _, count in self._locks.values())


def server_paths(catalog_path: str | Path | None, store: str | None, registry: Registry) -> list[tuple[str, str]]:
    """The paths of this server that a client is not told, each with what an answer says instead: the
    catalog file (or store), and the folders and files the registry names, by their ids or file names.
    Each as given, absolute and with links resolved; longest first, so a path inside another is
    replaced whole."""
    pairs: set[tuple[str, str]] = set()

    def add(path: str | Path, public: str) -> None:
        pairs.update((form, public) for form in {str(path), os.path.abspath(path), os.path.realpath(path)})

    if store is not None:
        add(store, "the store")
    elif catalog_path is not None:
        add(catalog_path, "the catalog")
    for model in registry.models.values():
        if Path(model.source).exists():  # a local folder, not a hub id
            add(model.source, model.id)
        if model.calibration_corpus:
            add(model.calibration_corpus, Path(model.calibration_corpus).name)
    for sae in registry.saes.values():
        add(sae.path, sae.id)
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _utf8(field: str, text: str) -> str:
    """``text`` if it can be written as UTF-8 (a JSON ``\\ud800`` escape decodes to a lone surrogate, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(field, f"not valid Unicode text (a lone surrogate at character {exc.start})") from None
    return text


class ApiService:
    """One catalog (held by this process), one registry, one device."""

    def __init__(self, catalog_path: str | Path | None, registry_path: str | Path | None, settings: ApiSettings,
                 read_only: bool | None = None, store: str | None = None) -> None:
        self.settings = settings
        self.sql_limits = sql_limits(settings)
        self.registry = Registry.load(registry_path)
        self.catalog = open_catalog(catalog_path, read_only, store)
        if settings.enable_sql:
            self._lock_down()
        self.discovery = Discovery(self.catalog, self.registry, device=settings.device, dtype=settings.dtype,
                                   allow_paths=False, max_models=settings.max_models, threads=settings.threads)
        self._same_run = KeyedLocks()
        self._hidden = server_paths(None if store else self.catalog.path, store, self.registry)  # $SAE_DISCOVER_DB too

    def redact(self, text: str) -> str:
        """``text`` (an error's message, a warning) without this server's paths (:func:`server_paths`)."""
        for path, public in self._hidden:
            text = text.replace(path, public)
        return text

    def public(self, answer: Any) -> Any:
        """An answer as a client gets it: warnings redacted (:meth:`redact`), a calibration's corpus by its
        file name (it may be any file the server's user calibrated on; ``corpus_hash`` says which)."""
        if isinstance(answer, list):
            return [self.public(item) for item in answer]
        if not isinstance(answer, dict):
            return answer
        out = {}
        for key, value in answer.items():
            if key == "calibration" and isinstance(value, dict) and isinstance(value.get("corpus"), str):
                out[key] = {**value, "corpus": Path(value["corpus"]).name}  # a response's or a feature's calibration
            elif key == "warnings" and isinstance(value, list):
                out[key] = [self.redact(w) if isinstance(w, str) else w for w in value]
            else:
                out[key] = self.public(value)
        return out

    def in_flight(self) -> int:
        """Discoveries running or waiting (a timed-out one keeps running until its run is stored)."""
        return len(self._same_run)

    def close(self, drain_s: float = 60.0) -> None:
        """Let running discoveries store their runs (up to ``drain_s``), then release the catalog file."""
        deadline = time.monotonic() + drain_s
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.catalog.close()

    def _at_most(self, name: str, value: int | None, limit: int, what: str = "") -> None:
        if value is not None and value > limit:
            raise RequestError(name, f"expected at most {limit}{what} on this server, got {value}")

    # -- discovery ---------------------------------------------------------------------------------
    def build(self, body: dict[str, Any]) -> DiscoverRequest:
        """The request model's validation, under this server's limits; registry ids only."""
        s = self.settings
        req = build_request({k: v for k, v in body.items() if v is not None}, max_text_chars=s.max_text_chars,
                            max_layers=s.max_layers)
        self._at_most("gen_tokens", req.gen_tokens, s.max_gen_tokens)
        self._at_most("return_top_x", req.return_top_x, s.max_return_top_x)
        self._at_most("restrict_features", len(req.restrict_features), s.max_restrict_features, " ids")
        self.registry.model(req.model_id, allow_paths=False)
        self.registry.sae(req.sae_id, allow_paths=False)
        return req

    def discover(self, req: DiscoverRequest) -> dict:
        # identical activations → one run: the second request waits and answers from the catalog
        key = json.dumps({k: v for k, v in req.to_dict().items() if k not in RANKING_FIELDS and k not in ("id", "tags")},
                         sort_keys=True, default=str)
        with self._same_run.hold(key):
            return self.public(self.discovery.discover(req))

    # -- drift -------------------------------------------------------------------------------------
    def drift(self, body: dict[str, Any]) -> dict:
        """A drift report (POST /v1/drift): the CLI's request model and function, registry ids only,
        run ids only for base_runs/tuned_runs (no SQL filters from clients)."""
        s = self.settings
        req = build_drift_request(body, max_prompts=s.max_drift_prompts, max_text_chars=s.max_text_chars,
                                  max_layers=s.max_layers)
        for name in ("base", "tuned"):
            if getattr(req, name) is not None:
                try:
                    self.registry.model(getattr(req, name), allow_paths=False)
                except RequestError as exc:  # the registry names model_id; here the field is base or tuned
                    raise RequestError(name, exc.message) from None
        if req.sae_id is not None:
            self.registry.sae(req.sae_id, allow_paths=False)
        self._at_most("gen_tokens", req.gen_tokens, s.max_gen_tokens)
        for item in req.prompts or []:
            if int(item.get("gen_tokens") or 0) > s.max_gen_tokens:
                raise RequestError("prompts", f"gen_tokens: expected at most {s.max_gen_tokens} on this server")
        with self._same_run.hold("drift"):  # drift ingests through the one discovery, one report at a time
            try:
                return self.public(drift_report(self.discovery, req, allow_sql_filter=False))
            except UnknownRun as exc:  # as on every route that names stored runs
                raise ApiError(404, exc.field, exc.message) from None

    # -- runs --------------------------------------------------------------------------------------
    def runs_page(self, limit: int, offset: int, model_id: str | None, sae_id: str | None,
                  mode: str | None = None, tags: list[str] | None = None, batch_ids: list[str] | None = None) -> dict:
        pairs = [parse_tag_filter("tag", t, ":") for t in tags or []]
        rows, total = runs.list_runs(self.catalog, limit, offset, model_id=model_id, sae_id=sae_id, mode=mode,
                                     tags=pairs, batch_ids=batch_ids or [])
        return {"runs": rows, "total": total, "limit": limit, "offset": offset}

    def resolve(self, run_id: str) -> str:
        """The full id of a run id or unique prefix; 404 when the catalog has no such run (the path names
        no resource, whether or not it could be a run id: then it says what one looks like)."""
        if runs.run_id_form(run_id) is None:
            raise ApiError(404, "run_id", f"no run {run_id!r}: a run id, or a unique prefix of it, has at least "
                                          f"{runs.MIN_PREFIX} hex characters")
        try:
            return runs.resolve_run_id(self.catalog, run_id)
        except UnknownRun:
            raise ApiError(404, "run_id", f"no run {run_id!r} in the catalog") from None

    def run_detail(self, run_id: str) -> dict:
        return runs.run_detail(self.catalog, self.resolve(run_id))  # type: ignore[return-value]

    def rank(self, run_id: str, options: dict[str, Any]) -> dict:
        full_id = self.resolve(run_id)
        return self.public(rerank(self.catalog, full_id, self._rank_options(options)))

    def rank_runs(self, body: dict[str, Any]) -> list[dict]:
        """Several stored runs ranked together (``POST /v1/runs/rank``): ``run_ids`` and/or the filters of
        ``GET /v1/runs`` (``tag`` as KEY:VALUE), plus ``batch_id``; at most ``max_page`` runs."""
        pick = {k: body.get(k) for k in RANK_SELECTION}
        options = self._rank_options({k: v for k, v in body.items() if k not in RANK_SELECTION})
        tags = [parse_tag_filter("tag", t, ":") for t in pick["tag"] or []]
        try:
            chosen = select_runs(self.catalog, pick["run_ids"] or [], tags, pick["batch_id"] or [], pick["model_id"],
                                 pick["sae_id"], pick["mode"])
        except UnknownRun as exc:
            raise ApiError(404, exc.field, exc.message) from None
        self._at_most(next((k for k in RANK_SELECTION if pick[k]), "run_ids"), len(chosen), self.settings.max_page,
                      " runs in one ranking")
        return self.public(rerank_runs(self.catalog, chosen, options))

    def _rank_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Ranking options given (None: the default), under this server's limits."""
        options = {k: v for k, v in options.items() if v is not None}
        self._at_most("return_top_x", options.get("return_top_x"), self.settings.max_return_top_x)
        self._at_most("restrict_features", len(options.get("restrict_features") or []),
                      self.settings.max_restrict_features, " ids")
        return options

    # -- features ----------------------------------------------------------------------------------
    def feature(self, sae_id: str, layer: int, stream: str, feature_id: int, limit: int,
                model_id: str | None = None) -> dict:
        """One feature across the stored runs; registry SAE ids only, 404 naming the field the catalog
        does not hold (the SAE, its hook, the feature id, or a calibration of ``model_id``)."""
        self.registry.sae(sae_id, allow_paths=False)
        try:
            return self.public(show_feature(self.catalog, {"sae_id": sae_id, "layer": layer, "stream": stream,
                                                           "feature_id": feature_id, "limit": limit,
                                                           "model_id": model_id}))
        except UnknownFeature as exc:
            raise ApiError(404, exc.field, exc.message) from None

    # -- labels ------------------------------------------------------------------------------------
    def import_labels(self, sae_id: str, fmt: str, content: str | None, files: dict[str, str] | None,
                      layer: int | None, stream: str | None, score_type: str | None = None) -> dict:
        if (layer is None) != (stream is None):
            raise RequestError("layer" if layer is None else "stream", "give layer and stream together")
        self.registry.sae(sae_id, allow_paths=False)
        body_field = "files" if fmt == "delphi" else "content"
        if fmt == "delphi":
            if content is not None:
                raise RequestError("content", "delphi labels come as files: {\"<module>_latent<N>.txt\": explanation}")
            if not files:
                raise RequestError("files", "expected {\"<module>_latent<N>.txt\": explanation, ...} for format delphi")
        else:
            if files is not None:
                raise RequestError("files", f"only format delphi takes files; give the {fmt} file's text as content")
            if content is None:
                raise RequestError("content", f"expected the {fmt} label file's text")
        with tempfile.TemporaryDirectory(prefix="sae-discover-labels-") as tmp:
            if fmt == "delphi":
                for name, text in (files or {}).items():
                    if Path(name).name != name or not DELPHI_NAME.match(name):
                        raise RequestError("files", f"expected file names <module>_latent<N>.txt, got {name!r}")
                    (Path(tmp) / name).write_text(_utf8("files", text), encoding="utf-8")
                path = Path(tmp)
            else:
                path = Path(tmp) / ("labels.csv" if fmt == "csv" else "labels.jsonl")
                path.write_text(_utf8("content", content or ""), encoding="utf-8")
            try:
                return self.discovery.import_labels(path, sae_id, fmt, layer, stream, score_type)
            except LabelFileError as exc:  # the file is the body field holding it; the column goes in the message
                message = exc.message.replace(tmp, "<upload>")
                if exc.field == "score_type":  # the file's scores need the body's score_type: name it
                    raise RequestError("score_type", message) from None
                column = "" if exc.field == "file" else f"{exc.field}: "
                raise RequestError(body_field, column + message) from None
            except CatalogError as exc:
                raise type(exc)(exc.field, exc.message.replace(tmp, "<upload>")) from None  # its kind kept (its status)

    # -- SQL over HTTP ------------------------------------------------------------------------------
    def _lock_down(self) -> None:
        """External access off, the memory limit, configuration locked: settings of the whole database,
        set once after opening (migrations ran) and before any request."""
        con = self.catalog.raw()
        try:
            sandbox.lock_down(con, self.sql_limits)
        except Exception:
            self.catalog.close()
            raise
        finally:
            con.close()

    def sql(self, query: str, limit: int) -> sandbox.QueryResult:
        """A client's read-only query (POST /v1/sql), at most ``limit`` rows and ``max_sql_bytes``, on its own
        cursor."""
        if not self.settings.enable_sql:
            raise ApiError(403, "enable_sql", "SQL over HTTP is off on this server; it answers when started with "
                                              "`serve --enable_sql` (README, SQL over HTTP)")
        con = self.catalog.raw()
        try:
            return sandbox.run_query(con, query, self.sql_limits, max_rows=limit,
                                     max_bytes=self.settings.max_sql_bytes)
        finally:
            con.close()

    # -- health ------------------------------------------------------------------------------------
    def health(self) -> dict:
        runs.ping(self.catalog)
        versions = getattr(self.catalog, "versions", None)  # a store's snapshot: what it pinned
        return {"status": "ok", "models": sorted(self.registry.models), "saes": sorted(self.registry.saes),
                "models_loaded": self.discovery.loaded_models(), "forward_runs": self.discovery.model_calls,
                "in_flight": self.in_flight(), "read_only": self.catalog.read_only, "limits": self.settings.public(),
                "store": {"name": store_name(self.catalog.path), "runs_version": versions["runs"]} if versions else None}


def store_name(uri: str) -> str:
    """A store's public name: its URI's last part (``s3://bucket/stores/demo`` → ``demo``), as a
    calibration's corpus is told by its file name."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def open_catalog(path: str | Path | None, read_only: bool | None, store: str | None) -> Catalog:
    """The served catalog: the file at ``path`` (read-only when asked, or when it is not writable), or with
    ``store`` a snapshot of that Delta store pinned when the server starts: read-only, so a request that
    would write (a run not stored yet, labels) answers 409 naming ``store``; restart to see newer commits."""
    if store is None:
        return Catalog(path, read_only=read_only)
    from catalog.store import StoreCatalog  # deltalake (the scale extra): only serve --store imports it

    return StoreCatalog(store)


def sql_limits(settings: ApiSettings) -> sandbox.Limits:
    """The sandbox limits of POST /v1/sql from the server's settings (a bad size names its setting)."""
    try:
        return sandbox.Limits(settings.sql_memory_limit, settings.sql_timeout_s, "serve --sql_memory_limit",
                              "serve --sql_timeout_s")
    except CatalogError as exc:
        raise RequestError(f"sql_{exc.field}", exc.message) from None


def sql_json(result: sandbox.QueryResult, limit: int) -> dict:
    """A query's result as the API's JSON: typed columns and rows of values (as ``sql --format json`` has them)."""
    return {"columns": [{"name": n, "type": t} for n, t in zip(result.columns or [], result.types, strict=True)],
            "rows": [[sandbox.json_value(v) for v in row] for row in result.rows],
            "row_count": len(result.rows), "truncated": result.truncated, "truncated_by": result.truncated_by,
            "limit": limit}


def sql_csv(result: sandbox.QueryResult) -> str:
    """A query's result as CSV: a header row of column names, then the rows (null as an empty cell)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if result.columns is not None:
        writer.writerow(result.columns)
        writer.writerows([sandbox.text_value(v) for v in row] for row in result.rows)
    return out.getvalue()
