"""Discovery, the table of contents of the flow: request → (cached or new) run → SQL ranking → response.

    plan_run        request → model, SAEs, hooks, run id         (plan.py; no weights loaded)
    find_runs       runs already stored are read back             (catalog/runs.py)
    run_many        prompt → hooks → kept tokens → sparse codes   (ingest/run.py, or worker processes: ingest/pool.py)
    write_runs      codes → rows, a group of whole runs at once   (catalog/writes.py)
    rank_stored     rows → ranked features, in SQL                (stored.py → catalog/ranking.py)
    response        ranked rows → the seed's JSON                 (response.py)

CLI, batch and the HTTP API all call :class:`Discovery`; nothing else joins ingest and catalog.
Models and SAE sources are loaded once per process and kept; forward passes are serialised by a
lock (one device), catalog writes go through the catalog's single writer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from catalog import runs
from catalog.db import Catalog
from catalog.errors import CatalogReadOnly
from catalog.ranking import ATTRIBUTION_MODES, NEEDS_BACKGROUND, NEEDS_CALIBRATION, check_pinned_saes
from catalog.writes import RunRows, RunTags, adopt_fingerprint, record_calibrations, tag_runs, write_runs
from ingest.pool import pool_runs
from ingest.run import MICRO_BATCH, RunBatch, run_many
from sae_discover.calibration import Calibrator
from sae_discover.errors import USER_ERRORS, RequestError
from sae_discover.inputs import read_corpus
from sae_discover.labels import import_labels
from sae_discover.loaders import Loaders
from sae_discover.plan import RunPlan, plan_run
from sae_discover.registry import Registry
from sae_discover.request import MAX_TOPK, DiscoverRequest, build_request
from sae_discover.response import attribution_notes, context_notes, discovery_response
from sae_discover.stored import rank_options, rank_stored
from sae_discover.verify import verify

Outcome = dict | Exception
Progress = Callable[[int], object]  # told the number of requests that just got their run


def line_timings(stages: dict[str, float], rank_s: float, verify_s: float | None = None) -> dict[str, float]:
    """One run's own timings: its stages (a micro-batch's shared passes split evenly between its runs),
    its share of the ranking, its verify_top ablations, and ``total_s``, their sum — never the time of
    the whole batch."""
    own = {**stages, "rank_s": rank_s, **({"verify_s": verify_s} if verify_s is not None else {})}
    return {**own, "total_s": sum(own.values())}


def _peers(plan: RunPlan) -> tuple:
    """What a batch background contrasts a request's run with: the requests of the same model, SAEs and
    restrict set (whatever ranking options their lines override: none changes a run's activations)."""
    return plan.entry.id, plan.entry.source, tuple(plan.saes), tuple(sorted(plan.req.restrict_features))


def _refuse_lone_contrasts(results: list[Outcome | None], plans: dict[int, RunPlan]) -> None:
    """A request ranked against a batch background (a score mode that uses it) that shares its model,
    SAEs and restrict set with no other request has nothing to be contrasted with: refused in place
    before any model runs, so that its run is neither made, stored nor tagged for a ranking that
    cannot be made."""
    runs_of: dict[tuple, set[str]] = {}  # distinct runs: two lines of one prompt are one run
    for p in plans.values():
        runs_of.setdefault(_peers(p), set()).add(p.run_id)
    for i, p in list(plans.items()):
        if p.req.background == "batch" and p.req.score_mode in NEEDS_BACKGROUND and len(runs_of[_peers(p)]) < 2:
            results[i] = RequestError("background", "batch contrasts each prompt with the other prompts sent with it "
                                                    "(same model, SAEs and restrict set), and this one has none: send "
                                                    "it with others (a prompts file), rank stored runs together (runs "
                                                    "rank --background batch), or use background calibration")
            del plans[i]


class Discovery:
    """One catalog + registry + device; models and SAEs cached across requests."""

    def __init__(self, catalog: Catalog, registry: Registry | None = None, device: str = "auto",
                 dtype: str = "float32", allow_paths: bool = True, max_models: int | None = None,
                 notify: Callable[[str], None] | None = None, threads: int | None = None) -> None:
        self.catalog = catalog
        self.loaders = Loaders(registry or Registry.load(), device, dtype, allow_paths, max_models, threads)
        self.loaders.on_card = lambda entry, card: adopt_fingerprint(catalog, entry.id, card.fingerprint,
                                                                     card.legacy_fingerprint)
        self._forward_lock = threading.Lock()
        self.calibrator = Calibrator(catalog, self.loaders, self._forward_lock, notify)
        self.model_calls = 0  # forward runs done by this process (tests check caching with it)

    @property
    def registry(self) -> Registry:
        return self.loaders.registry

    @property
    def allow_paths(self) -> bool:
        return self.loaders.allow_paths

    # -- step 1: what the request's run is ------------------------------------------------------------
    def prepare(self, req: DiscoverRequest) -> RunPlan:
        """Resolve ids, hooks and the run id without loading weights; refuse what cannot be answered."""
        plan = plan_run(self.loaders, req)
        if req.score_mode in ATTRIBUTION_MODES and req.attribution_target == "none":
            raise RequestError("score_mode", f"{req.score_mode} ranks by attributions, and this run has none: "
                                             "give attribution_target (e.g. continuation or next_tokens)")
        if req.calibration_id is not None:  # a pinned calibration that cannot rank it: before its run is made
            check_pinned_saes(self.catalog, plan.saes, req.calibration_id)
        if req.background_file is not None:  # before any run is made for this request
            self._background_docs(req.background_file)
        no_background = req.background_text is None and req.background_file is None and req.background != "batch"
        needs_calibration = req.score_mode in NEEDS_CALIBRATION
        if (needs_calibration or (req.score_mode in NEEDS_BACKGROUND and no_background)) \
                and not plan.entry.calibration_corpus \
                and not all(self.calibrator.has_stats(info, plan.entry) for info in plan.saes):
            needs = ("a calibration (how features are active together in its documents)" if needs_calibration
                     else "a background")
            advice = "" if needs_calibration else " give background_text / background_file,"
            raise RequestError("score_mode", f"{req.score_mode} needs {needs}; calibrate the SAE first "
                                             f"(python -m sae_discover calibrate),{advice} or pick another "
                                             "score_mode")
        return plan

    # -- the whole flow -------------------------------------------------------------------------------
    def discover(self, req: DiscoverRequest) -> dict:
        (result,) = self.discover_many([req])
        if isinstance(result, Exception):
            raise result
        return result

    def discover_many(self, reqs: list[DiscoverRequest], batch_size: int = MICRO_BATCH, workers: int = 1,
                      progress: Progress | None = None) -> list[Outcome]:
        """Several requests: cached runs are read back, the others run through the model in groups of
        ``batch_size`` (same model, SAE source and hooks), each group's runs written whole in one
        transaction, then ranked. With ``workers`` > 1, worker processes run the model and this process
        is the one writer. A request that fails yields its exception in place; the others go on.
        ``progress(n)`` is told as requests get their run: per prompt in this process, per micro-batch
        from worker processes (each request once)."""
        results, plans, stored = self.stored_runs(reqs, batch_size, workers, progress)
        self._tag(plans, stored)
        groups: dict[tuple, list[int]] = {}  # runs ranked together: same model, SAEs and ranking options
        peers: dict[tuple, list[int]] = {}  # what a batch background contrasts with: same model, SAEs, restrict set
        peer_key: dict[int, tuple] = {}
        for i, p in plans.items():
            if results[i] is None:
                alone = p.req.background_text is not None or p.req.background_file is not None
                # per model id: calibration (on first use) and τ belong to the registry entry, not its path
                runs_like = (p.entry.id, p.entry.source, tuple(p.saes))
                key = ("alone", i) if alone else (*runs_like, repr(rank_options(p.req)))
                groups.setdefault(key, []).append(i)
                peer_key[i] = _peers(p)
                peers.setdefault(peer_key[i], []).append(i)
        for members in groups.values():
            # a batch background contrasts each run with the other runs of the batch like it, whatever ranking
            # options their lines override (none changes a run's activations): the group is ranked whole, with them
            batch = plans[members[0]].req.background == "batch"
            step = len(members) if batch else batch_size
            contrast = [stored[i] for i in peers[peer_key[members[0]]] if i not in members] if batch else []
            for start in range(0, len(members), step):
                part = members[start:start + step]
                try:
                    answers: list[Outcome] = self._respond([plans[i] for i in part], [stored[i] for i in part],
                                                           contrast)
                except USER_ERRORS as exc:
                    answers = [exc] * len(part)
                for i, answer in zip(part, answers, strict=True):
                    results[i] = answer
        return results  # type: ignore[return-value]

    # -- steps 2-4: make sure every run is stored -----------------------------------------------------
    def stored_runs(self, reqs: list[DiscoverRequest], batch_size: int = MICRO_BATCH, workers: int = 1,
                    progress: Progress | None = None
                    ) -> tuple[list[Outcome | None], dict[int, RunPlan], dict[int, dict]]:
        """Make sure every request's run is in the catalog: ``(errors, plans, stored runs)`` by index."""
        tell = progress or (lambda n: None)
        results: list[Outcome | None] = [None] * len(reqs)
        plans: dict[int, RunPlan] = {}
        for i, req in enumerate(reqs):
            try:
                plans[i] = self.prepare(req)
            except USER_ERRORS as exc:
                results[i] = exc
        _refuse_lone_contrasts(results, plans)
        found = runs.find_runs(self.catalog, [p.run_id for p in plans.values()])
        stored = {i: {**found[p.run_id], "cached": True, "timings": {}} for i, p in plans.items() if p.run_id in found}
        tell(len(reqs) - len(plans) + len(stored))  # refused and cached requests are done already
        self._refuse_new_runs_if_read_only(results, plans, stored, tell)
        groups: dict[tuple, list[int]] = {}  # runs computed together: same model, SAE source and hooks
        for i, p in plans.items():
            if i not in stored and results[i] is None:
                groups.setdefault((p.entry.source, p.source.root, tuple(p.hooks)), []).append(i)
        chunks = [members[start:start + batch_size] for members in groups.values()
                  for start in range(0, len(members), batch_size)]
        for chunk, outcome in self._compute([[plans[i] for i in c] for c in chunks], chunks, workers, tell):
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                stored.update(self._store([plans[i] for i in chunk], chunk, *outcome))
            except USER_ERRORS as exc:
                for i in chunk:
                    results[i] = exc
        return results, plans, stored

    def _refuse_new_runs_if_read_only(self, results: list[Outcome | None], plans: dict[int, RunPlan],
                                      stored: dict[int, dict], tell: Progress) -> None:
        """On a read-only catalog, a request whose run is not stored gets the catalog's refusal in place
        (before any model runs: its run could not be stored); stored runs are still answered."""
        missing = [i for i in plans if i not in stored]
        if not missing or not self.catalog.read_only:
            return
        try:
            self.catalog.require_writable("a request whose run is not stored yet")
        except CatalogReadOnly as exc:
            for i in missing:
                results[i] = exc
        tell(len(missing))

    def _compute(self, batches: list[list[RunPlan]], chunks: list[list[int]], workers: int, tell: Progress
                 ) -> Iterator[tuple[list[int], tuple[list[RunBatch], int] | Exception]]:
        """``(chunk, (outputs, d_model) | error)`` per micro-batch, in this process or in worker processes;
        ``tell(n)`` once per request of each micro-batch."""
        if workers > 1 and len(batches) > 1:
            jobs = [(b[0].entry.id, b[0].entry.source, b[0].source.sae_id, str(b[0].source.root), b[0].hooks,
                     [p.spec for p in b]) for b in batches]
            for index, outcome in pool_runs(jobs, workers, self.loaders.device, self.loaders.dtype, USER_ERRORS,
                                            self.loaders.threads):
                if not isinstance(outcome, Exception):
                    self.model_calls += len(outcome[0])
                tell(len(chunks[index]))
                yield chunks[index], outcome
            return
        for batch, chunk in zip(batches, chunks, strict=True):
            told = 0

            def one(n: int) -> None:
                nonlocal told
                told += n
                tell(n)

            try:
                first = batch[0]
                loaded = self.loaders.model(first.entry)
                saes = [first.source.load(layer, stream).to(loaded.device) for layer, stream in first.hooks]
                with self._forward_lock:
                    outputs = run_many(loaded, saes, [p.spec for p in batch], on_sequence=one)
                    self.model_calls += len(batch)
                yield chunk, (outputs, loaded.d_model)
            except USER_ERRORS as exc:
                tell(len(batch) - told)  # the rest of a failed micro-batch is done too
                yield chunk, exc

    def _store(self, batch: list[RunPlan], indices: list[int], outputs: list[RunBatch], d_model: int
               ) -> dict[int, dict]:
        """Write a micro-batch's runs in one transaction (the single writer; group commit, each run whole)."""
        t_write = time.perf_counter()
        rows = [RunRows(p.run_row(out.n_tokens, out.n_kept, out.timings), p.model_info(d_model), p.saes, out.tokens,
                        out.activations) for p, out in zip(batch, outputs, strict=True)]
        written = write_runs(self.catalog, rows)
        write_s = (time.perf_counter() - t_write) / len(rows)
        return {i: {**r.run, "run_key": run_key, "cached": not created, "timings": {**r.run["timings"], "write_s": write_s}}
                for i, r, (run_key, created) in zip(indices, rows, written, strict=True)}

    def _tag(self, plans: dict[int, RunPlan], stored: dict[int, dict]) -> None:
        """Store each request's ``id`` (as the run's batch_id) and merge its ``tags`` into its run, new
        and cached runs alike (tags are not part of the run id), in one small transaction."""
        tag_runs(self.catalog, [RunTags(stored[i]["run_key"], p.req.id, p.req.tags or {})
                                for i, p in plans.items() if i in stored])

    # -- steps 5-6: rank in SQL and answer ------------------------------------------------------------
    def _respond(self, plans: list[RunPlan], stored: list[dict], contrast: list[dict] | None = None) -> list[dict]:
        """Rank stored runs that share model, SAEs and ranking options (one set of statements for all)
        and shape each one's response as the seed does. ``contrast``: more stored runs a batch background
        contrasts them with (scored with them, not returned)."""
        first = plans[0]
        t_cal = time.perf_counter()
        notes = self.calibrator.ensure(first.entry, first.source, first.hooks)
        if notes:  # the first line pays for a first-use calibration, and says so
            stored = [{**stored[0], "timings": {**stored[0]["timings"], "calibrate_s": time.perf_counter() - t_cal}},
                      *stored[1:]]
        t_rank = time.perf_counter()
        req = first.req
        has_background = req.background_text is not None or req.background_file is not None
        background = self.background(req) if has_background else None
        ranked = rank_stored(self.catalog, [run["run_key"] for run in stored], first.saes, req, background,
                             [run["run_key"] for run in contrast or []])
        record_calibrations(self.catalog, {run["run_key"]: r["calibrations"] for run, r in zip(stored, ranked, strict=True)})
        verify_s: dict[int, float] = {}
        for n, (p, run, r) in enumerate(zip(plans, stored, ranked, strict=True)):
            if p.req.verify_top:
                t_verify = time.perf_counter()
                r["verification"] = self._verify(p, run, r, rank_options(p.req, background))
                verify_s[n] = time.perf_counter() - t_verify
        texts = runs.run_texts(self.catalog, [run["run_key"] for run in stored])
        rank_s = (time.perf_counter() - t_rank - sum(verify_s.values())) / len(plans)
        out = []
        for n, (p, run, r) in enumerate(zip(plans, stored, ranked, strict=True)):
            continuation = (texts.get(run["run_key"]) or {}).get("continuation")
            notes_n = [*(notes if n == 0 else []),  # a first-use calibration is reported once
                       *p.bos_notes(), *context_notes(run, p.card.context_length, continuation),
                       *attribution_notes(p.req.attribution_target, run, continuation), *self._precision_notes(p)]
            out.append(discovery_response(p.req, p.run_id, run, p.layers, p.streams, r, notes_n,
                                          line_timings(run["timings"], rank_s, verify_s.get(n)), texts.get(run["run_key"])))
        return out

    def _precision_notes(self, plan: RunPlan) -> list[str]:
        """verify_top in half precision: its measured deltas are about as small as the rounding of M."""
        if not plan.req.verify_top or self.loaders.dtype == "float32":
            return []
        return [f"verify_top: the ablations ran in {self.loaders.dtype}, whose rounding of M is about as large as "
                "small deltas (signs can flip); verify with --dtype float32"]

    def _verify(self, plan: RunPlan, run: dict, ranked: dict, opts) -> dict:
        """verify_top: the ablation forward passes on the stored run (sae_discover/verify.py)."""
        loaded = self.loaders.model(plan.entry)
        with self._forward_lock:
            return verify(self.catalog, loaded, plan, run, ranked, runs.sae_keys_of(self.catalog, plan.saes), opts)

    def _background_docs(self, path: str) -> list[str]:
        """The background file's documents; read once before any run is made too (a bad document must
        not fail the request after its run is stored)."""
        if not self.allow_paths:
            raise RequestError("background_file", "this server does not read files; send background_text")
        return read_corpus(path, "background_file")

    def background(self, req: DiscoverRequest) -> list[int]:
        """Stored runs of ``background_text`` / ``background_file`` (one document per line) with every
        token kept, over the request's model, SAEs and hooks: selectivity's background (their run keys)."""
        docs = [req.background_text] if req.background_text is not None else self._background_docs(req.background_file)
        reqs = [build_request({"model_id": req.model_id, "sae_id": req.sae_id, "text": doc,
                               **({"hooks": req.hooks} if req.hooks else {"layers": req.layers, "streams": req.streams}),
                               "restrict_features": req.restrict_features,
                               "topk_tokens_per_seq": MAX_TOPK}) for doc in docs]
        errors, _, stored = self.stored_runs(reqs)
        failed = next((e for e in errors if isinstance(e, Exception)), None)
        if failed is not None:
            raise RequestError("background_text", f"the background could not be analysed: {failed}")
        return [stored[i]["run_key"] for i in range(len(reqs))]

    # -- catalog work that needs the model --------------------------------------------------------------
    def calibrate(self, model_id: str, sae_id: str, corpus: str | Path, hooks: list[tuple[int, str]] | None = None,
                  lite_labels: bool = True, progress: bool = False) -> dict:
        return self.calibrator.calibrate(model_id, sae_id, corpus, hooks, lite_labels, progress)

    def import_labels(self, path: str | Path, sae_id: str, fmt: str | None = None, layer: int | None = None,
                      stream: str | None = None, score_type: str | None = None) -> dict:
        return import_labels(self.catalog, self.loaders.source(sae_id), path, fmt, layer, stream, score_type)

    def loaded_models(self) -> list[str]:
        return self.loaders.loaded_models()
