"""What the routes call: the CLI's functions (Discovery, rerank, label import) under the server's rules.

- registry ids only (``Discovery(..., allow_paths=False)``); bodies validated by the one request model;
- models loaded once and kept, at most ``max_models`` (least recently used dropped);
- forward passes serialised (Discovery's lock), identical requests coalesced (the second one waits
  and reads the first one's run from the catalog), catalog writes through the catalog's writer lock;
- reads concurrent: one DuckDB cursor per call (``Catalog.raw()``).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from api.errors import ApiError
from api.settings import ApiSettings
from catalog import store
from catalog.db import Catalog, CatalogError
from catalog.labels import DELPHI_NAME
from sae_discover.registry import ModelEntry, Registry
from sae_discover.request import DiscoverRequest, RequestError, build_request
from sae_discover.rerank import RANKING_FIELDS, rerank
from sae_discover.service import Discovery

RUN_COLUMNS = ("run_id", "model_id", "sae_id", "mode", "prompt", "text", "generate", "gen_tokens", "seed", "created_at",
               "n_tokens", "n_kept", "layers", "streams")


class ServedDiscovery(Discovery):
    """Discovery for a long-lived process: a bounded model cache, first-use calibration done once."""

    def __init__(self, *args: Any, max_models: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_models = max_models
        self._calibration_lock = threading.Lock()

    def model(self, entry: ModelEntry):
        with self._load_lock:
            loaded = super().model(entry)
            self._models[entry.source] = self._models.pop(entry.source)  # most recently used last
            evicted = False
            while len(self._models) > self.max_models:
                del self._models[next(iter(self._models))]  # a run still using it keeps its reference
                evicted = True
            if evicted:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return loaded

    def loaded_models(self) -> list[str]:
        with self._load_lock:
            return [m.model_id for m in self._models.values()]

    def ensure_calibration(self, entry, source, hooks) -> list[str]:
        with self._calibration_lock:  # two first requests must not both calibrate the same SAE
            return super().ensure_calibration(entry, source, hooks)


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


class ApiService:
    """One catalog (held by this process), one registry, one device."""

    def __init__(self, catalog_path: str | Path | None, registry_path: str | Path | None, settings: ApiSettings) -> None:
        self.settings = settings
        self.registry = Registry.load(registry_path)
        self.catalog = Catalog(catalog_path)
        self.discovery = ServedDiscovery(self.catalog, self.registry, device=settings.device, dtype=settings.dtype,
                                         allow_paths=False, max_models=settings.max_models)
        self._same_run = KeyedLocks()

    def in_flight(self) -> int:
        """Discoveries running or waiting (a timed-out one keeps running until its run is stored)."""
        return len(self._same_run)

    def close(self, drain_s: float = 60.0) -> None:
        """Let running discoveries store their runs (up to ``drain_s``), then release the catalog file."""
        deadline = time.monotonic() + drain_s
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.catalog.close()

    # -- discovery ---------------------------------------------------------------------------------
    def build(self, body: dict[str, Any]) -> DiscoverRequest:
        """The request model's validation, under this server's limits; registry ids only."""
        s = self.settings
        req = build_request({k: v for k, v in body.items() if v is not None}, max_text_chars=s.max_text_chars,
                            max_layers=s.max_layers)
        if req.gen_tokens > s.max_gen_tokens:
            raise RequestError("gen_tokens", f"expected at most {s.max_gen_tokens} on this server, got {req.gen_tokens}")
        if req.return_top_x > s.max_return_top_x:
            raise RequestError("return_top_x", f"expected at most {s.max_return_top_x} on this server, "
                                               f"got {req.return_top_x}")
        if len(req.restrict_features) > s.max_restrict_features:
            raise RequestError("restrict_features", f"expected at most {s.max_restrict_features} ids on this server")
        self.registry.model(req.model_id, allow_paths=False)
        self.registry.sae(req.sae_id, allow_paths=False)
        return req

    def discover(self, req: DiscoverRequest) -> dict:
        # identical activations → one run: the second request waits and answers from the catalog
        key = json.dumps({k: v for k, v in asdict(req).items() if k not in RANKING_FIELDS and k != "id"},
                         sort_keys=True, default=str)
        with self._same_run.hold(key):
            return self.discovery.discover(req)

    # -- drift -------------------------------------------------------------------------------------
    def drift(self, body: dict[str, Any]) -> dict:
        """A drift report (POST /v1/drift): the CLI's request model and function, registry ids only,
        run ids only for base_runs/tuned_runs (no SQL filters from clients)."""
        from sae_discover.drift import build_drift_request, drift_report

        s = self.settings
        req = build_drift_request(body, max_prompts=s.max_drift_prompts, max_text_chars=s.max_text_chars,
                                  max_layers=s.max_layers)
        for name in ("base", "tuned"):
            if getattr(req, name) is not None:
                self.registry.model(getattr(req, name), allow_paths=False)
        if req.sae_id is not None:
            self.registry.sae(req.sae_id, allow_paths=False)
        if req.gen_tokens is not None and req.gen_tokens > s.max_gen_tokens:
            raise RequestError("gen_tokens", f"expected at most {s.max_gen_tokens} on this server, got {req.gen_tokens}")
        for item in req.prompts or []:
            if int(item.get("gen_tokens") or 0) > s.max_gen_tokens:
                raise RequestError("prompts", f"gen_tokens: expected at most {s.max_gen_tokens} on this server")
        with self._same_run.hold("drift"):  # drift ingests through the one discovery, one report at a time
            return drift_report(self.discovery, req, allow_sql_filter=False)

    # -- runs --------------------------------------------------------------------------------------
    def runs_page(self, limit: int, offset: int, model_id: str | None, sae_id: str | None) -> dict:
        where, params = [], []
        for name, value in (("model_id", model_id), ("sae_id", sae_id)):
            if value is not None:
                where.append(f"{name} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        con = self.catalog.raw()
        try:
            (total,) = con.execute(f"SELECT count(*) FROM v_runs {clause}", params).fetchone()
            cols = ", ".join("created_at::TIMESTAMPTZ AS created_at" if c == "created_at" else c for c in RUN_COLUMNS)
            cur = con.execute(f"SELECT {cols} FROM v_runs {clause} "
                              f"ORDER BY created_at DESC, run_key DESC LIMIT ? OFFSET ?", [*params, limit, offset])
            rows = [dict(zip(RUN_COLUMNS, r, strict=True)) for r in cur.fetchall()]
        finally:
            con.close()
        return {"runs": [_summary(r) for r in rows], "total": int(total), "limit": limit, "offset": offset}

    def _stored(self, run_id: str) -> dict:
        run = store.find_run(self.catalog, run_id)
        if run is None:
            raise ApiError(404, "run_id", f"no run {run_id!r} in the catalog")
        return run

    def run_detail(self, run_id: str) -> dict:
        run = self._stored(run_id)
        saes = store.run_saes(self.catalog, run["run_key"])
        con = self.catalog.raw()
        try:  # stored as local TIMESTAMP: name its time zone (RFC 3339 date-time)
            (run["created_at"],) = con.execute("SELECT created_at::TIMESTAMPTZ FROM runs WHERE run_key = ?",
                                               [run["run_key"]]).fetchone()
        finally:
            con.close()
        return {**_summary(run), "temperature": run["temperature"], "top_p": run["top_p"],
                "token_proxy": run["token_proxy"], "topk_tokens_per_seq": run["topk_tokens_per_seq"],
                "restrict_features": json.loads(run["restrict_features"] or "[]"),
                "timings": json.loads(run["timings"] or "{}"),
                "saes": [{k: s[k] for k in ("sae_id", "layer", "stream", "hook_name", "architecture", "d_in", "d_sae",
                                            "fingerprint")} for s in saes]}

    def rank(self, run_id: str, options: dict[str, Any]) -> dict:
        self._stored(run_id)
        options = {k: v for k, v in options.items() if v is not None}
        if options.get("return_top_x", 0) > self.settings.max_return_top_x:
            raise RequestError("return_top_x", f"expected at most {self.settings.max_return_top_x} on this server")
        return rerank(self.catalog, run_id, options)

    # -- labels ------------------------------------------------------------------------------------
    def import_labels(self, sae_id: str, fmt: str, content: str | None, files: dict[str, str] | None,
                      layer: int | None, stream: str | None) -> dict:
        if (layer is None) != (stream is None):
            raise RequestError("layer" if layer is None else "stream", "give layer and stream together")
        self.registry.sae(sae_id, allow_paths=False)
        field = "files" if fmt == "delphi" else "content"
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
                    (Path(tmp) / name).write_text(text, encoding="utf-8")
                path = Path(tmp)
            else:
                path = Path(tmp) / ("labels.csv" if fmt == "csv" else "labels.jsonl")
                path.write_text(content or "", encoding="utf-8")
            try:
                return self.discovery.import_labels(path, sae_id, fmt, layer, stream)
            except CatalogError as exc:
                message = str(exc).replace(tmp, "<upload>")
                if message.startswith("file: "):  # the parsers name the file; here it is the body field
                    message = f"{field}: {message[len('file: '):]}"
                raise CatalogError(message) from None

    # -- health ------------------------------------------------------------------------------------
    def health(self) -> dict:
        con = self.catalog.raw()
        try:
            con.execute("SELECT count(*) FROM runs").fetchone()
        finally:
            con.close()
        return {"status": "ok", "models": sorted(self.registry.models), "saes": sorted(self.registry.saes),
                "models_loaded": self.discovery.loaded_models(), "forward_runs": self.discovery.model_calls,
                "in_flight": self.in_flight(),
                "limits": self.settings.public()}


def _summary(row: dict) -> dict:
    out = {k: row[k] for k in RUN_COLUMNS}
    out["layers"] = json.loads(row["layers"] or "[]")
    out["streams"] = json.loads(row["streams"] or "[]")
    return out
