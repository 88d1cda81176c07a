"""The discovery service: request → (cached or new) run in the catalog → SQL ranking → seed's response.

CLI, batch and the HTTP API all call :class:`Discovery`; nothing else joins ingest and catalog.
Models and SAE sources are loaded once per process and kept; forward passes are serialised by a
lock (one device), catalog writes go through the catalog's single writer.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from catalog import queries, store
from catalog.db import Catalog, CatalogError
from ingest import worker
from ingest.models import ENCODERS, LoadedModel, ModelCard, ModelError, load_model, read_card, resolve_device
from ingest.saes.base import SAEError
from ingest.saes.sources import SAESource, file_fingerprint, open_source
from sae_discover.registry import ModelEntry, Registry
from sae_discover.request import INT_BOUNDS, DiscoverRequest, RequestError, build_request
from sae_discover.rerank import RANKING_FIELDS

# Runs handed to the model (or a worker process) together and committed together: one catalog
# transaction per group costs about what one run's would (DuckDB's cost is per statement), so 16
# runs per group make the writes ~16x cheaper per run (see catalog/store.py)
RUNS_PER_GROUP = 16


def read_corpus(path: str | Path) -> list[str]:
    """One document per line: plain text, or JSONL with a ``text`` field (SPEC.md)."""
    file = Path(path)
    if not file.exists():
        raise RequestError("corpus", f"{file} does not exist")
    docs = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RequestError("corpus", f"{file}:{number} is not JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise RequestError("corpus", f"{file}:{number} has no string field 'text'")
            docs.append(obj["text"])
        else:
            docs.append(line)
    if not docs:
        raise RequestError("corpus", f"{file} holds no documents")
    return docs


@dataclass
class _Prepared:
    """A validated request with everything resolved that names its run."""

    req: DiscoverRequest
    entry: ModelEntry
    card: ModelCard
    source: SAESource
    layers: list[int]
    hooks: list[tuple[int, str]]
    saes: list[store.SAEInfo]
    run_id: str

    @property
    def spec(self) -> worker.RunSpec:
        """What the worker needs to make this run (the run-fixing options of the request)."""
        r = self.req
        return worker.RunSpec(prompt=r.prompt, text=r.text, generate=r.generate, gen_tokens=r.gen_tokens, seed=r.seed,
                              temperature=r.temperature, top_p=r.top_p, hooks=self.hooks, token_proxy=r.token_proxy,
                              topk_tokens_per_seq=r.topk_tokens_per_seq, restrict_features=r.restrict_features)


class Discovery:
    """One catalog + registry + device; models and SAEs cached across requests."""

    def __init__(self, catalog: Catalog, registry: Registry | None = None, device: str = "auto",
                 dtype: str = "float32", allow_paths: bool = True) -> None:
        self.catalog = catalog
        self.registry = registry or Registry.load()
        self.device = device
        self.dtype = dtype
        self.allow_paths = allow_paths
        self._models: dict[str, LoadedModel] = {}
        self._cards: dict[str, ModelCard] = {}
        self._sources: dict[str, SAESource] = {}
        self._forward_lock = threading.Lock()
        self._load_lock = threading.RLock()
        self._calibrated: set[tuple] = set()
        self.model_calls = 0  # forward runs done by this process (tests check caching with it)

    # -- resolution --------------------------------------------------------------------------------
    def card(self, entry: ModelEntry) -> ModelCard:
        with self._load_lock:
            if entry.source not in self._cards:
                self._cards[entry.source] = read_card(entry.source)
            return self._cards[entry.source]

    def model(self, entry: ModelEntry) -> LoadedModel:
        with self._load_lock:
            if entry.source not in self._models:
                self._models[entry.source] = load_model(entry.id, entry.source, self.device, self.dtype)
            return self._models[entry.source]

    def source(self, sae_id: str) -> SAESource:
        with self._load_lock:
            entry = self.registry.sae(sae_id, self.allow_paths)
            if entry.path not in self._sources:
                self._sources[entry.path] = open_source(sae_id, entry.path)
            return self._sources[entry.path]

    def _hooks(self, req: DiscoverRequest, entry: ModelEntry, card: ModelCard, source: SAESource):
        layers = req.layers or entry.default_layers
        for layer in layers:
            if not 0 <= layer < card.n_layers:
                raise RequestError("layers", f"layer {layer} is out of range for {req.model_id} "
                                             f"({card.n_layers} layers: 0..{card.n_layers - 1})")
        hooks = [(layer, stream) for layer in layers for stream in req.streams]
        for layer, stream in hooks:
            source.folder(layer, stream)  # raises with the list of hooks the source has
        return layers, hooks

    def sae_infos(self, source: SAESource, hooks) -> list[store.SAEInfo]:
        infos = []
        for layer, stream in hooks:
            cfg = source.config(layer, stream)
            infos.append(store.SAEInfo(source.sae_id, layer, stream, source.fingerprint(layer, stream),
                                       cfg.hook_name, cfg.architecture, cfg.d_in, cfg.d_sae))
        return infos

    @staticmethod
    def run_id(req: DiscoverRequest, card: ModelCard, saes: list[store.SAEInfo], tokenizer_fp: str,
               precision: list[str] | None = None) -> str:
        """Hash of everything that fixes the activations (ranking options excluded)."""
        gen = req.text is None and req.generate
        key = {
            "model": [req.model_id, card.fingerprint, tokenizer_fp], "prompt": req.prompt, "text": req.text,
            "generate": gen, "gen_tokens": req.gen_tokens if gen else 0, "seed": req.seed if gen else None,
            "temperature": req.temperature if gen else None, "top_p": req.top_p if gen else None,
            "saes": sorted([s.sae_id, s.layer, s.stream, s.fingerprint] for s in saes),
            "token_proxy": req.token_proxy, "topk": req.topk_tokens_per_seq, "restrict": sorted(req.restrict_features),
            "precision": precision or ["float32", "cpu"],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    # -- discovery ---------------------------------------------------------------------------------
    def prepare(self, req: DiscoverRequest) -> _Prepared:
        """Resolve ids, hooks and the run id without loading any weights (validation happens here)."""
        entry = self.registry.model(req.model_id, self.allow_paths)
        card = self.card(entry)
        if card.family in ENCODERS and req.text is None and req.generate:
            raise RequestError("generate", f"{req.model_id} is an encoder ({card.family}) and cannot generate; "
                                           "send `text` (text mode) or set generate=false")
        source = self.source(req.sae_id)
        layers, hooks = self._hooks(req, entry, card, source)
        saes = self.sae_infos(source, hooks)
        for info in saes:
            beyond = [f for f in req.restrict_features if f >= info.d_sae]
            if beyond:
                raise RequestError("restrict_features", f"feature {beyond[0]} is beyond the {info.d_sae} features of "
                                                        f"the SAE for layer {info.layer} {info.stream}")
        no_background = req.background_text is None and req.background_file is None
        if req.score_mode == "selectivity" and no_background and not entry.calibration_corpus \
                and not all(self._has_stats(info, entry) for info in saes):
            raise RequestError("score_mode", "selectivity needs a background; calibrate the SAE first "
                                             "(python -m sae_discover calibrate), give background_text / "
                                             "background_file, or pick another score_mode")
        precision = [self.dtype, resolve_device(self.device).type]  # bf16 activations are another run
        return _Prepared(req, entry, card, source, layers, hooks, saes,
                         self.run_id(req, card, saes, _tokenizer_fingerprint(entry.source), precision))

    def discover(self, req: DiscoverRequest) -> dict:
        (result,) = self.discover_many([req])
        if isinstance(result, Exception):
            raise result
        return result

    def discover_many(self, reqs: list[DiscoverRequest], batch_size: int = RUNS_PER_GROUP, workers: int = 1
                      ) -> list[dict | Exception]:
        """Several requests: cached runs are read back, the others run through the model in groups of
        ``batch_size`` (same model, SAE source and hooks), each group's runs written whole in one
        transaction, then ranked.
        With ``workers`` > 1, worker processes run the model and this process is the one writer.
        A request that fails yields its exception in place; the others go on."""
        t0 = time.perf_counter()
        results, prepared, stored = self._stored_runs(reqs, batch_size, workers)
        groups: dict[tuple, list[int]] = {}  # runs ranked together: same model, SAEs and ranking options
        for i, p in prepared.items():
            if results[i] is None:
                alone = p.req.background_text is not None or p.req.background_file is not None
                # per model id: calibration (on first use) and τ belong to the registry entry, not its path
                key = ("alone", i) if alone else (p.entry.id, p.entry.source, tuple(p.saes), repr(_rank_options(p.req)))
                groups.setdefault(key, []).append(i)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                part = members[start:start + batch_size]
                try:
                    answers: list = self._respond([prepared[i] for i in part], [stored[i] for i in part], t0)
                except USER_ERRORS as exc:
                    answers = [exc] * len(part)
                for i, answer in zip(part, answers, strict=True):
                    results[i] = answer
        return results  # type: ignore[return-value]

    def _stored_runs(self, reqs: list[DiscoverRequest], batch_size: int = RUNS_PER_GROUP, workers: int = 1):
        """Make sure every request's run is in the catalog: ``(errors, prepared, stored runs)`` by index."""
        results: list[dict | Exception | None] = [None] * len(reqs)
        prepared: dict[int, _Prepared] = {}
        stored: dict[int, dict] = {}
        for i, req in enumerate(reqs):
            try:
                prepared[i] = self.prepare(req)
            except USER_ERRORS as exc:
                results[i] = exc
        found = store.find_runs(self.catalog, [p.run_id for p in prepared.values()])
        stored.update({i: {**found[p.run_id], "cached": True, "timings": {}}
                       for i, p in prepared.items() if p.run_id in found})
        groups: dict[tuple, list[int]] = {}
        for i, p in prepared.items():
            if i not in stored:
                groups.setdefault((p.entry.source, p.source.root, tuple(p.hooks)), []).append(i)
        chunks = [members[start:start + batch_size] for members in groups.values()
                  for start in range(0, len(members), batch_size)]
        for chunk, outcome in self._compute_all([[prepared[i] for i in c] for c in chunks], chunks, workers):
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                stored.update(self._store([prepared[i] for i in chunk], chunk, *outcome))
            except USER_ERRORS as exc:
                for i in chunk:
                    results[i] = exc
        return results, prepared, stored

    def background(self, req: DiscoverRequest) -> tuple[list[int], int]:
        """Stored runs of ``background_text`` / ``background_file`` (one document per line) with every
        token kept, over the request's model, SAEs and hooks: selectivity's background."""
        if req.background_file is not None and not self.allow_paths:
            raise RequestError("background_file", "this server does not read files; send background_text")
        docs = [req.background_text] if req.background_text is not None else read_corpus(req.background_file)
        reqs = [build_request({"model_id": req.model_id, "sae_id": req.sae_id, "text": doc, "layers": req.layers,
                               "streams": req.streams, "restrict_features": req.restrict_features,
                               "topk_tokens_per_seq": INT_BOUNDS["topk_tokens_per_seq"][1]}) for doc in docs]
        errors, _, stored = self._stored_runs(reqs)
        failed = next((e for e in errors if isinstance(e, Exception)), None)
        if failed is not None:
            raise RequestError("background_text", f"the background could not be analysed: {failed}")
        runs = [stored[i] for i in range(len(reqs))]
        return [r["run_key"] for r in runs], sum(r["n_kept"] for r in runs)

    def _compute_all(self, batches: list[list[_Prepared]], chunks: list[list[int]], workers: int):
        """Yield ``(chunk, (outputs, d_model) | exception)`` per micro-batch, in this process or in a pool."""
        if workers <= 1 or len(batches) <= 1:
            for batch, chunk in zip(batches, chunks, strict=True):
                try:
                    first = batch[0]
                    loaded = self.model(first.entry)
                    sae_objs = [first.source.load(layer, stream).to(loaded.device) for layer, stream in first.hooks]
                    with self._forward_lock:
                        outputs = worker.run_many(loaded, sae_objs, [p.spec for p in batch])
                        self.model_calls += len(batch)
                    yield chunk, (outputs, loaded.d_model)
                except USER_ERRORS as exc:
                    yield chunk, exc
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker.init_worker_process,
                                 initargs=(workers, self.device, self.dtype)) as pool:
            futures = {pool.submit(worker.pool_run, b[0].entry.id, b[0].entry.source, b[0].source.sae_id,
                                   str(b[0].source.root), b[0].hooks, [p.spec for p in b]): c
                       for b, c in zip(batches, chunks, strict=True)}
            for future in as_completed(futures):
                try:
                    outputs, d_model = future.result()
                    self.model_calls += len(outputs)
                    yield futures[future], (outputs, d_model)
                except USER_ERRORS as exc:
                    yield futures[future], exc

    def _store(self, batch: list[_Prepared], indices: list[int], outputs: list[worker.RunBatch], d_model: int
               ) -> dict[int, dict]:
        """Write a micro-batch's runs in one transaction (the single writer; group commit, each run whole)."""
        t_write = time.perf_counter()
        rows = []
        for p, run_batch in zip(batch, outputs, strict=True):
            req = p.req
            mode = p.spec.mode
            run = {"run_id": p.run_id, "model_id": req.model_id, "sae_id": req.sae_id, "mode": mode,
                   "prompt": req.prompt, "text": req.text, "generate": mode == "prompt+gen",
                   "gen_tokens": req.gen_tokens if mode == "prompt+gen" else 0, "seed": req.seed,
                   "temperature": req.temperature, "top_p": req.top_p, "token_proxy": req.token_proxy,
                   "topk_tokens_per_seq": req.topk_tokens_per_seq, "layers": p.layers, "streams": req.streams,
                   "restrict_features": req.restrict_features, "n_tokens": run_batch.n_tokens,
                   "n_kept": run_batch.n_kept, "timings": run_batch.timings}
            model_info = store.ModelInfo(req.model_id, p.card.fingerprint, p.card.family, p.card.n_layers, d_model)
            rows.append(store.RunRows(run, model_info, p.saes, run_batch.tokens, run_batch.activations))
        written = store.write_runs(self.catalog, rows)
        write_s = (time.perf_counter() - t_write) / len(rows)
        return {i: {**r.run, "run_key": run_key, "cached": not created, "timings": {**r.run["timings"], "write_s": write_s}}
                for i, r, (run_key, created) in zip(indices, rows, written, strict=True)}

    def _respond(self, ps: list[_Prepared], runs: list[dict], t0: float) -> list[dict]:
        """Rank stored runs that share model, SAEs and ranking options (one set of statements for all)
        and shape each one's response as the seed does."""
        first = ps[0]
        warns = self.ensure_calibration(first.entry, first.source, first.hooks)
        t_rank = time.perf_counter()
        ranked = self.rank([(run["run_key"], run["n_kept"]) for run in runs], first.saes, first.req)
        rank_s = (time.perf_counter() - t_rank) / len(ps)
        out = []
        for n, (p, run, r) in enumerate(zip(ps, runs, ranked, strict=True)):
            req = p.req
            notes = list(warns) if n == 0 else []  # a first-use calibration is reported once
            if r["threshold_source"] == "none":
                notes.append("no calibration for this SAE: τ = 0 (active means act > 0) and scores are not "
                             "normalized; run `python -m sae_discover calibrate` to fix both")
            timings = {**run["timings"], "rank_s": rank_s, "total_s": time.perf_counter() - t0}
            out.append(response(req, p.run_id, run, p.layers, req.streams, r, notes)
                       | {"timings": {k: round(v, 4) for k, v in timings.items()}}
                       | ({"id": req.id} if req.id is not None else {}))
        return out

    def rank(self, runs: list[tuple[int, int]], saes: list[store.SAEInfo], req: DiscoverRequest) -> list[dict]:
        has_background = req.background_text is not None or req.background_file is not None
        return self.rank_stored(self.catalog, runs, saes, req, self.background(req) if has_background else None)

    @staticmethod
    def rank_stored(catalog: Catalog, runs: list[tuple[int, int]], saes: list[store.SAEInfo],
                    req: DiscoverRequest, background: tuple[list[int], int] | None = None) -> list[dict]:
        """Rank stored runs ``(run_key, n_kept)`` in SQL (no model needed), all with ``req``'s ranking
        options, and shape their features as the seed does."""
        con = catalog.raw()
        try:
            keys = store.sae_keys(con, saes)
        finally:
            con.close()
        opts = _rank_options(req)
        if background is not None:
            opts.background_runs, opts.background_n = background
        try:
            ranked = queries.rank_runs(catalog, runs, keys, opts)
        except ValueError as exc:
            raise RequestError.of(exc, "request") from exc
        for r in ranked:
            r["features"] = [_feature_json(f, req) for f in r["features"]]
        return ranked

    # -- calibration -------------------------------------------------------------------------------
    def ensure_calibration(self, entry: ModelEntry, source: SAESource, hooks) -> list[str]:
        """Registry entries with a ``calibration_corpus`` (the demo) calibrate missing SAEs on first use."""
        if not entry.calibration_corpus:
            return []
        missing = [h for h, info in zip(hooks, self.sae_infos(source, hooks), strict=True)
                   if not self._has_stats(info, entry)]
        if not missing:
            return []
        self.calibrate(entry.id, source.sae_id, entry.calibration_corpus, missing)
        return [f"calibrated {len(missing)} SAE(s) on {entry.calibration_corpus} (first use)"]

    def _has_stats(self, info: store.SAEInfo, entry: ModelEntry) -> bool:
        """Whether this model has calibrated this SAE (thresholds are per model and SAE)."""
        fingerprint = self.card(entry).fingerprint
        if (info, entry.id, fingerprint) in self._calibrated:  # calibrations are never deleted
            return True
        con = self.catalog.raw()
        try:
            (key,) = store.sae_keys(con, [info])
            model = con.execute("SELECT model_key FROM models WHERE model_id = ? AND fingerprint = ?",
                                [entry.id, fingerprint]).fetchall()
            found = bool(model) and queries.calibration_for(con, key, model[0][0]) is not None
        finally:
            con.close()
        if found:
            self._calibrated.add((info, entry.id, fingerprint))
        return found

    def calibrate(self, model_id: str, sae_id: str, corpus: str | Path, hooks=None, lite_labels: bool = True) -> dict:
        """Run every token of ``corpus`` through model + SAEs; store per-feature stats (and lite labels)."""
        entry = self.registry.model(model_id, self.allow_paths)
        source = self.source(sae_id)
        hooks = list(hooks or sorted(source.hooks))
        card = self.card(entry)
        for layer, _ in hooks:
            if not 0 <= layer < card.n_layers:
                raise RequestError("layers", f"layer {layer} is out of range for {model_id} ({card.n_layers} layers)")
        docs = read_corpus(corpus)
        loaded = self.model(entry)
        sae_objs = [source.load(layer, stream).to(loaded.device) for layer, stream in hooks]
        with self._forward_lock:
            tokens, acts = worker.calibration_batches(loaded, sae_objs, hooks, docs)
        infos = self.sae_infos(source, hooks)
        model_info = store.ModelInfo(model_id, card.fingerprint, card.family, card.n_layers, loaded.d_model)
        cal_id = store.write_calibration(self.catalog, model_info, infos, str(corpus),
                                         file_fingerprint(Path(corpus)), len(docs), tokens, acts)
        if lite_labels:
            for info, sae in zip(infos, sae_objs, strict=True):
                store.write_lite_labels(self.catalog, cal_id, info, worker.promoted_tokens(loaded, sae))
        return {"calibration_id": cal_id, "n_docs": len(docs), "n_tokens": tokens.num_rows,
                "hooks": [list(h) for h in hooks], "activation_rows": acts.num_rows}


    # -- labels ------------------------------------------------------------------------------------
    def import_labels(self, path: str | Path, sae_id: str, fmt: str | None = None, layer: int | None = None,
                      stream: str | None = None) -> dict:
        """Import an AutoInterp label file for the SAEs of ``sae_id`` (one transaction for the whole file).

        Each row's hook comes from ``layer``/``stream`` when given, else from the file (Neuronpedia's
        ``layer`` field, delphi's module, CSV columns), else from the source when it has one SAE.
        """
        import pyarrow as pa

        from catalog import labels

        rows = labels.parse(path, fmt)
        source = self.source(sae_id)
        if (layer is None) != (stream is None):
            raise RequestError("layer" if layer is None else "stream", "give --layer and --stream together")
        groups: dict[tuple[int, str], list[labels.LabelRow]] = {}
        for row in rows:
            if row.sae is not None and row.sae != sae_id:
                raise RequestError("sae", f"a row of the file names SAE {row.sae!r}; this import is for {sae_id!r} "
                                          "(split the file, or import it once per SAE)")
            hook = (layer, stream) if layer is not None else row.hook
            if hook is None:
                if len(source.hooks) != 1:
                    raise RequestError("layer", f"the file does not say which hook its labels belong to and "
                                                f"{sae_id!r} has {len(source.hooks)} SAEs; pass --layer and --stream")
                hook = next(iter(source.hooks))
            groups.setdefault(hook, []).append(row)
        batches = []
        for hook, group in sorted(groups.items()):
            (info,) = self.sae_infos(source, [hook])
            too_big = [r.feature_id for r in group if r.feature_id >= info.d_sae]
            if too_big:
                raise RequestError("feature_id", f"{too_big[0]} is beyond the {info.d_sae} features of the SAE for "
                                                 f"layer {hook[0]} {hook[1]}")
            batches.append((info, pa.table({
                "feature_id": pa.array([r.feature_id for r in group], pa.int32()),
                "label": [r.label for r in group], "source": [r.source for r in group],
                "score": pa.array([r.score for r in group], pa.float64())})))
        n = store.write_labels(self.catalog, batches)
        return {"imported": n, "hooks": [list(h) for h in sorted(groups)]}


def _tokenizer_fingerprint(source: str) -> str:
    path = Path(source)
    files = [p for p in (path / "tokenizer.json", path / "tokenizer.model", path / "vocab.json") if p.exists()]
    return file_fingerprint(*files) if files else source


def response(req: DiscoverRequest, run_id: str, run: dict, layers: list[int], streams: list[str], ranked: dict,
             notes: list[str]) -> dict:
    """The seed's response for a ranked stored run (``run``: its catalog row plus ``cached``)."""
    return {"model_id": req.model_id, "sae_id": req.sae_id, "run_id": run_id, "cached": run["cached"],
            "analyzed": {"mode": run["mode"], "tokens": run["n_kept"], "layers": layers, "streams": streams,
                         "total_tokens": run["n_tokens"]},
            "score_mode": req.score_mode, "threshold_source": ranked["threshold_source"],
            "normalization": ranked["normalization"], "features": ranked["features"], "warnings": notes}


def _rank_options(req: DiscoverRequest) -> queries.RankOptions:
    """The request's ranking options (they never change a run), plus the restrict set it was made with."""
    return queries.RankOptions(**{name: getattr(req, name) for name in (*RANKING_FIELDS, "restrict_features")})


def _feature_json(f: dict, req: DiscoverRequest) -> dict:
    """One feature in the seed's shape."""
    out = {"feature_id": int(f["feature_id"]), "layer": int(f["layer"]), "stream": f["stream"],
           "score": float(f["score"]),
           "scores": {"mean": float(f["mean"]), "coverage": float(f["coverage"]), "max": float(f["max"]),
                      "selectivity": None if f["selectivity"] is None else float(f["selectivity"])}}
    if req.attach_proto_labels:
        out["proto_label"] = f.get("proto_label")
    if req.attach_examples:
        out["top_spans"] = f.get("top_spans", [])
    return out


USER_ERRORS = (RequestError, SAEError, ModelError, CatalogError)
warnings.filterwarnings("ignore", message=".*TypedStorage.*")
