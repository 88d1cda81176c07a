"""Distributed ingest: a prompts file into a shared Delta store (:mod:`catalog.store`), in chunks run by
Ray actors (``--ray``) or, without Ray, by this process or a local process pool (``--workers``).

    Workers       started first: Ray actors or pool processes that load the model
                  while the driver plans, and keep it for every chunk they take
    plan_job      lines → requests → run ids (no weights), the job id, its chunks     (this process, the driver)
    prepare       tables created, models/SAEs registered, run keys reserved, runs
                  already stored left out (one scan of the store per job)             (before fan-out)
    ingest_chunk  model + SAEs over a chunk's prompts (ingest.run.run_many), one
                  Delta append per table with the chunk's marker, ``runs`` last       (a worker; retried safely)

The job id is a hash of the job's run ids and chunk size, so rerunning the same command resumes the
job: committed chunks are skipped by their marker (``<job>:chunk-<i>``), the others computed. Run ids
are those of local batch mode (:func:`sae_discover.plan.plan_run`). A run already in the store (from
another job, found when the job starts) is not computed again.

Chunk size (:func:`chunk_runs`): a chunk costs two commit latencies whatever its size (its child
tables concurrently, then ``runs``), so chunks should be large; but each worker should get at least
:data:`CHUNKS_PER_WORKER` of them, so none idles while another finishes the last one. The default
is the runs spread over that many chunks per worker, capped at :data:`DEFAULT_CHUNK` runs (README,
Beyond one machine, for the measured costs behind both numbers).

``calibrate --store`` runs the same way: corpus chunks are the tasks (:func:`calibrate_chunk` commits
their codes), then the driver computes the statistics in SQL over the store and commits them, the
``calibrations`` row last (:func:`calibrate_store`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from catalog import stats, store
from catalog.writes import with_sae_keys
from ingest.lens import decoder_tokens
from ingest.models import ModelCard
from ingest.run import calibration_batches, run_many
from ingest.saes.sources import file_fingerprint
from sae_discover.batch import line_request
from sae_discover.calibration import check_hooks, stability_warnings
from sae_discover.errors import USER_ERRORS, RequestError
from sae_discover.inputs import read_corpus, read_lines
from sae_discover.loaders import Loaders
from sae_discover.plan import RunPlan, plan_run, sae_infos
from sae_discover.registry import Registry
from sae_discover.request import DiscoverRequest

DEFAULT_CHUNK = 64  # most runs per chunk by default: one Delta commit per table each (README, Beyond one machine)
CHUNKS_PER_WORKER = 2  # the default chunk size leaves each worker at least this many chunks


@dataclass
class Chunk:
    """One unit of work and of commit: its marker and ``(run_key, request)`` per run."""

    index: int
    marker: str
    items: list[tuple[int, DiscoverRequest]]


@dataclass
class Job:
    """A planned job: its id, chunks, per-line errors, and the keys its workers write with."""

    job_id: str
    chunks: list[Chunk]
    errors: dict[int, str] = field(default_factory=dict)  # line number → one-line error
    model_keys: dict[tuple, int] = field(default_factory=dict)  # (model_id, fingerprint) → model_key
    sae_keys: dict[tuple, int] = field(default_factory=dict)  # (sae_id, layer, stream, fingerprint) → sae_key


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs besides its chunk (picklable: it travels to Ray actors and pool processes)."""

    store: str
    registry: str | None
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None


# -- the driver -------------------------------------------------------------------------------------

def chunk_runs(runs: int, workers: int) -> int:
    """The default chunk size: ``runs`` over :data:`CHUNKS_PER_WORKER` chunks per worker, at most
    :data:`DEFAULT_CHUNK` runs (a larger job makes more chunks of that size, not larger ones)."""
    return max(1, min(DEFAULT_CHUNK, math.ceil(runs / (CHUNKS_PER_WORKER * max(workers, 1)))))


def plan_job(loaders: Loaders, lines: list[tuple[int, dict | str]], defaults: dict[str, Any],
             chunk_size: int | None = None, job_id: str | None = None, workers: int = 1) -> tuple[Job, list[RunPlan]]:
    """Validate and plan every line (no weights loaded); distinct runs in input order, cut into chunks
    of ``chunk_size`` runs (default :func:`chunk_runs` for ``workers``)."""
    base = {k: v for k, v in defaults.items() if k not in ("prompt", "text")}
    plans: list[RunPlan] = []
    errors: dict[int, str] = {}
    seen: dict[str, RunPlan] = {}
    for number, obj in lines:
        try:
            plan = plan_run(loaders, line_request(base, obj))
        except USER_ERRORS as exc:
            errors[number] = str(exc)
            continue
        if plan.run_id in seen:  # a repeated line is one run; as in batch mode, its id and tags win
            first = seen[plan.run_id].req
            first.id = plan.req.id if plan.req.id is not None else first.id
            first.tags = {**(first.tags or {}), **(plan.req.tags or {})} or first.tags
            continue
        seen[plan.run_id] = plan
        plans.append(plan)
    chunk_size = chunk_size or chunk_runs(len(plans), workers)
    job_id = job_id or hashlib.sha256(json.dumps([chunk_size, [p.run_id for p in plans]]).encode()).hexdigest()[:16]
    chunks = [Chunk(i, f"{job_id}:chunk-{i}", [(0, p.req) for p in plans[start:start + chunk_size]])
              for i, start in enumerate(range(0, len(plans), chunk_size))]
    return Job(job_id, chunks, errors), plans


def prepare(uri: str, job: Job, plans: list[RunPlan]) -> list[str]:
    """Before fan-out: create the store's tables, register the job's models and SAEs (keys reserved,
    rows committed), and give each run its run_key from the job's reserved range (the same range on
    every resume: recorded once, with the job's marker). Runs the store already holds (from another
    job, or this job's committed chunks) leave their chunk: one scan of ``runs`` here, none per chunk;
    the tags and batch ids this job gives them are added by :func:`label_stored_runs` (its warnings
    returned)."""
    store.create_tables(uri)
    job.model_keys = _register_models(uri, job.job_id, {p.req.model_id: p.card for p in plans})
    saes = {(s.sae_id, s.layer, s.stream, s.fingerprint): s for p in plans for s in p.saes}
    job.sae_keys = _register(uri, job.job_id, "sae", "saes", ("sae_id", "layer", "stream", "fingerprint"), {
        ident: {"sae_id": s.sae_id, "layer": s.layer, "stream": s.stream, "hook_name": s.hook_name,
                "architecture": s.architecture, "d_in": s.d_in, "d_sae": s.d_sae, "fingerprint": s.fingerprint}
        for ident, s in saes.items()})
    first = _job_keys(uri, job.job_id, "run", len(plans))
    stored = store.find_keys(uri, "runs", "run_key", ("run_id",), [(p.run_id,) for p in plans])
    ids = {id(p.req): p.run_id for p in plans}
    n = 0
    for chunk in job.chunks:
        keyed = [(first + n + i, req) for i, (_, req) in enumerate(chunk.items)]
        chunk.items = [(key, req) for key, req in keyed if (ids[id(req)],) not in stored]
        n += len(keyed)
    return label_stored_runs(uri, job.job_id, [(stored[(p.run_id,)], p) for p in plans if (p.run_id,) in stored])


def label_stored_runs(uri: str, job_id: str, runs: list[tuple[int, RunPlan]]) -> list[str]:
    """Add the tags and batch ids this job gives runs the store already holds: a tag key (a batch id)
    the run lacks is appended, one append per table whose marker hashes the rows (so a rerun, or the
    same rows from another job, adds nothing twice). A key the run holds with another value keeps the
    stored one — the store is append-only and its rows have no order for local batch mode's "the new
    value wins" — and is returned as a warning naming the run."""
    keys = [key for key, _ in runs]
    if not keys:
        return []
    in_keys = pc.field("run_key").isin(keys)
    held_tags = {(r["run_key"], r["key"]): r["value"] for r in store.open_table(uri, "run_tags")
                 .to_pyarrow_dataset().to_table(filter=in_keys).to_pylist()}
    held_ids = {r["run_key"]: r["batch_id"] for r in store.open_table(uri, "run_batch_ids")
                .to_pyarrow_dataset().to_table(filter=in_keys).to_pylist()}
    tags, ids, warnings = [], [], []
    for key, p in runs:
        for name, value in (p.req.tags or {}).items():
            if (key, name) not in held_tags:
                tags.append({"run_key": key, "key": name, "value": value})
            elif held_tags[(key, name)] != value:
                warnings.append(f"tags: run {p.run_id} is stored with {name}={held_tags[(key, name)]}; kept "
                                f"(not {value}: the store is append-only)")
        if p.req.id is not None and key not in held_ids:
            ids.append({"run_key": key, "batch_id": p.req.id})
        elif p.req.id is not None and held_ids[key] != p.req.id:
            warnings.append(f"id: run {p.run_id} is stored with batch id {held_ids[key]}; kept (not {p.req.id}: "
                            "the store is append-only)")
    for table, rows in (("run_tags", tags), ("run_batch_ids", ids)):
        if rows:
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
            store.append(uri, table, pa.Table.from_pylist(rows), marker=f"{job_id}:labels-{digest}")
    return warnings


def _register_models(uri: str, job_id: str, cards: dict[str, ModelCard]) -> dict[tuple, int]:
    """Keys of these models (by id) in the store, by (model_id, fingerprint). A model the store knows
    only by the path-dependent fingerprint of earlier versions (``legacy_fingerprint``) keeps that key —
    its calibrations, labels and runs carry over, as a local catalog adopts it — rather than a second one."""
    rows = {(mid, card.fingerprint): {"model_id": mid, "fingerprint": card.fingerprint, "family": card.family,
                                      "n_layers": card.n_layers, "d_model": card.d_model} for mid, card in cards.items()}
    aliases = {(mid, card.fingerprint): (mid, card.legacy_fingerprint) for mid, card in cards.items()
               if card.legacy_fingerprint}
    return _register(uri, job_id, "model", "models", ("model_id", "fingerprint"), rows, aliases)


def _register(uri: str, job_id: str, kind: str, table: str, match: tuple[str, ...], rows: dict[tuple, dict],
              aliases: dict[tuple, tuple] | None = None) -> dict[tuple, int]:
    """Keys of these models/SAEs in the store; those not there get reserved keys and their rows.
    ``aliases``: another identity of a row, whose key it keeps where the store holds only that one."""
    keys = store.find_keys(uri, table, f"{kind}_key", match, rows)
    missing = {ident: aliases[ident] for ident in rows if ident not in keys and ident in (aliases or {})}
    if missing:
        held = store.find_keys(uri, table, f"{kind}_key", match, missing.values())
        keys.update({ident: held[alias] for ident, alias in missing.items() if alias in held})
    new = [ident for ident in rows if ident not in keys]
    if new:
        first = store.reserve_keys(uri, kind, len(new), job_id)
        keys.update({ident: first + i for i, ident in enumerate(new)})
        store.append(uri, table, pa.Table.from_pylist(
            [{**rows[ident], f"{kind}_key": keys[ident], "created_at": datetime.now()} for ident in new]))
    return keys


def _job_keys(uri: str, job_id: str, kind: str, count: int) -> int:
    """The first key of the job's range of ``kind`` (run, calibration): the one recorded for this job,
    else a new reservation, recorded (kind ``<kind>-job``, with the job's marker) so that a resumed job
    writes the same keys."""
    ranges = store.open_table(uri, store.KEY_RANGES).to_pyarrow_table()
    mine = ranges.filter(pc.and_(pc.equal(ranges["kind"], f"{kind}-job"), pc.equal(ranges["job"], job_id)))
    if mine.num_rows:
        return int(mine["first"][0].as_py())
    first = store.reserve_keys(uri, kind, count, job_id)
    record = pa.table({"kind": [f"{kind}-job"], "first": pa.array([first], pa.int64()),
                       "count": pa.array([count], pa.int64()), "job": [job_id], "token": [job_id]},
                      schema=store.arrow_schema(store.KEY_RANGES))
    if not store.append(uri, store.KEY_RANGES, record, marker=f"{job_id}:keys"):  # recorded meanwhile
        return _job_keys(uri, job_id, kind, count)
    return first


# -- a worker ---------------------------------------------------------------------------------------

_WORKER: dict = {}  # this process's Loaders, kept across chunks (models and SAEs stay loaded)


def _loaders(config: WorkerConfig) -> Loaders:
    key = (config.registry, config.device, config.dtype, config.threads)
    if _WORKER.get("key") != key:
        _WORKER.update(key=key, loaders=Loaders(Registry.load(config.registry), config.device, config.dtype,
                                                threads=config.threads))
    return _WORKER["loaders"]


def warm(config: WorkerConfig, model_ids: tuple[str, ...] = ()) -> None:
    """Start a worker: its Loaders, and these models loaded (torch and the model's code imported), so
    that its first chunk finds them; a model id the registry does not know is left to that chunk."""
    loaders = _loaders(config)
    for model_id in model_ids:
        try:
            loaders.model(loaders.entry(model_id))
        except USER_ERRORS:  # its chunk's planning reports it, naming the field
            continue


def ingest_chunk(config: WorkerConfig, chunk: Chunk, model_keys: dict, sae_keys: dict) -> dict:
    """Compute and commit one chunk (safe to retry: a committed chunk, or table, is skipped by its
    marker). Returns ``{"chunk", "runs", "skipped"}``. Plans again only to get each run's loaded
    objects (cached per worker); which runs to compute was settled by :func:`prepare`."""
    if store.chunk_done(config.store, chunk.marker):
        return {"chunk": chunk.index, "runs": 0, "skipped": True}
    loaders = _loaders(config)
    todo = [(key, plan_run(loaders, req)) for key, req in chunk.items]
    tables = chunk_tables(loaders, todo, model_keys, sae_keys)
    store.commit_chunk(config.store, chunk.marker, tables,
                       before_point=lambda: pause_point("children-committed", chunk.index))
    pause_point("committed", chunk.index)
    return {"chunk": chunk.index, "runs": len(todo), "skipped": False}


PAUSE_ENV = "SAE_DISCOVER_TEST_PAUSE"  # tests only: a folder of armed pause points (:func:`pause_point`)
PAUSE_LIMIT_S = 300  # a paused worker nobody kills or releases goes on after this long


def pause_point(name: str, chunk: int) -> None:
    """A test hook, off unless ``$SAE_DISCOVER_TEST_PAUSE`` names a folder: the first worker to reach
    point ``name`` while the file ``<folder>/<name>`` exists claims it (renames it to
    ``<name>.<pid>.<chunk>``: atomic, so the point fires once, for one worker) and waits there until
    the claimed file is removed. So tests/test_store.py can SIGKILL a real worker at a known step of a
    chunk ("children-committed": its child tables committed, not its ``runs`` rows; "committed": the
    whole chunk committed, its result not yet returned) without racing on timing."""
    folder = os.environ.get(PAUSE_ENV)
    if not folder:
        return
    armed = Path(folder) / name
    claimed = armed.with_name(f"{name}.{os.getpid()}.{chunk}")
    try:
        armed.rename(claimed)
    except FileNotFoundError:  # not armed, or another worker claimed it
        return
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while claimed.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def chunk_tables(loaders: Loaders, todo: list[tuple[int, RunPlan]], model_keys: dict, sae_keys: dict
                 ) -> dict[str, pa.Table]:
    """The store rows of these runs, run_key-ordered: runs, run_saes, tokens, activations, tags, batch ids."""
    groups: dict[tuple, list[tuple[int, RunPlan]]] = {}  # computed together: same model, SAE source and hooks
    for key, p in todo:
        groups.setdefault((p.entry.source, str(p.source.root), tuple(p.hooks)), []).append((key, p))
    made: list[tuple[int, RunPlan, Any]] = []
    for members in groups.values():
        first = members[0][1]
        loaded = loaders.model(first.entry)
        saes = [first.source.load(layer, stream).to(loaded.device) for layer, stream in first.hooks]
        outputs = run_many(loaded, saes, [p.spec for _, p in members])
        made += [(key, p, out) for (key, p), out in zip(members, outputs, strict=True)]
    made.sort(key=lambda m: m[0])
    return _rows(made, model_keys, sae_keys)


def _rows(made: list[tuple[int, RunPlan, Any]], model_keys: dict, sae_keys: dict) -> dict[str, pa.Table]:
    if not made:
        return {}
    now = datetime.now()
    runs, run_saes, tokens, acts, key_lists, counts, tags, ids = [], [], [], [], [], [], [], []
    for key, p, out in made:
        row = p.run_row(out.n_tokens, out.n_kept, out.timings)
        for name in ("layers", "streams", "restrict_features", "timings"):
            row[name] = json.dumps(row[name])
        runs.append({**row, "run_key": key, "model_key": model_keys[(p.req.model_id, p.card.fingerprint)],
                     "created_at": now})
        keys = np.asarray([sae_keys[(s.sae_id, s.layer, s.stream, s.fingerprint)] for s in p.saes], np.int32)
        run_saes += [{"run_key": key, "sae_key": int(k)} for k in keys]
        tokens.append(out.tokens.append_column("run_key", pa.array(np.full(out.tokens.num_rows, key, np.int32))))
        acts.append(out.activations)
        key_lists.append(keys)
        counts.append(out.activations.num_rows)
        tags += [{"run_key": key, "key": k, "value": v} for k, v in (p.req.tags or {}).items()]
        if p.req.id is not None:
            ids.append({"run_key": key, "batch_id": p.req.id})
    stacked = pa.concat_tables(acts, promote_options="default").combine_chunks()
    run_keys = np.repeat(np.asarray([m[0] for m in made], np.int32), counts)
    return {"runs": pa.Table.from_pylist(runs), "run_saes": pa.Table.from_pylist(run_saes),
            "tokens": pa.concat_tables(tokens, promote_options="default"),
            "activations": with_sae_keys(stacked, key_lists, counts).append_column("run_key", pa.array(run_keys)),
            "run_tags": pa.Table.from_pylist(tags), "run_batch_ids": pa.Table.from_pylist(ids)}


# -- running the chunks -----------------------------------------------------------------------------

def run_job(job: Job, config: WorkerConfig, workers: int = 1, ray_address: str | None = None,
            use_ray: bool = False, progress: Callable[[int], object] | None = None) -> list[dict]:
    """Every chunk of ``job``, each at most once in the store; ``progress(1)`` per finished chunk."""
    return run_tasks(ingest_chunk, config, job.chunks, (job.model_keys, job.sae_keys), workers, ray_address, use_ray,
                     progress)


def run_tasks(task: Callable[..., dict], config: WorkerConfig, chunks: list, shared: tuple, workers: int = 1,
              ray_address: str | None = None, use_ray: bool = False, progress: Callable[[int], object] | None = None
              ) -> list[dict]:
    """``task(config, chunk, *shared)`` for every chunk, on :class:`Workers` started for them;
    ``progress(1)`` per finished chunk. Returns the tasks' results in chunk order."""
    with Workers(config, workers, ray_address, use_ray) as pool:
        return _collect(pool.map(task, chunks, shared), progress)


def _collect(results: Iterator[dict], progress: Callable[[int], object] | None) -> list[dict]:
    done = []
    for result in results:
        done.append(result)
        if progress:
            progress(1)
    return sorted(done, key=lambda r: r["chunk"])


def _ready() -> None:
    """A no-op task: submitting one per pool process starts them all at once (each runs its initializer)."""


class ChunkWorker:
    """One Ray actor: a worker process that loads its models once and runs every chunk it is given."""

    def __init__(self, config: WorkerConfig, models: tuple[str, ...]) -> None:
        warm(config, models)

    def run(self, task: Callable[..., dict], config: WorkerConfig, chunk: Any, *shared: Any) -> dict:
        return task(config, chunk, *shared)


class Workers:
    """Where a job's chunks run, started once and kept for all of them: this process (``workers`` 1),
    ``workers`` local processes, or Ray actors (``use_ray``: one per GPU where the cluster has GPUs,
    else ``workers`` of one CPU each). Each worker loads the models named in ``models`` as it starts —
    while the driver plans — and keeps its Loaders (model, SAEs) and open Delta tables for every chunk
    it takes. Actors rather than Ray tasks: a task that asks for a GPU gets a fresh process each time
    (Ray's default for GPU tasks), which would load the model per chunk. A dead actor is restarted and
    its chunk retried (``max_restarts``, ``max_task_retries``); the chunk's marker makes that safe. A
    local Ray started here is shut down on close."""

    def __init__(self, config: WorkerConfig, workers: int = 1, ray_address: str | None = None, use_ray: bool = False,
                 models: tuple[str, ...] = ()) -> None:
        self.config, self.size = config, max(workers, 1)
        self._pool: ProcessPoolExecutor | None = None
        self._actors: list = []
        self._own_ray = False
        if use_ray:
            self._start_actors(ray_address, models)
        elif self.size > 1:
            self._pool = ProcessPoolExecutor(self.size, mp_context=get_context("spawn"), initializer=warm,
                                             initargs=(config, models))
            for _ in range(self.size):
                self._pool.submit(_ready)

    def _start_actors(self, address: str | None, models: tuple[str, ...]) -> None:
        import ray  # optional (the scale extra): only --ray imports it

        if not ray.is_initialized():
            if address in (None, "local"):  # "local": a new Ray even where a `ray start` cluster runs (or RAY_ADDRESS is set)
                ray.init(address="local", num_cpus=self.size, include_dashboard=False, log_to_driver=False)
            else:
                _check_reachable(address)
                ray.init(address=address, log_to_driver=False)
            self._own_ray = True
        gpus = int(ray.cluster_resources().get("GPU", 0)) if self.config.device != "cpu" else 0
        self.size = gpus or self.size
        actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=3, max_task_retries=3)(ChunkWorker)
        self._actors = [actor.remote(self.config, models) for _ in range(self.size)]

    def map(self, task: Callable[..., dict], chunks: list, shared: tuple) -> Iterator[dict]:
        """``task(config, chunk, *shared)`` for every chunk; results as they finish."""
        if self._actors:
            yield from self._actor_map(task, chunks, shared)
        elif self._pool is not None:
            futures = [self._pool.submit(task, self.config, chunk, *shared) for chunk in chunks]
            for future in as_completed(futures):
                yield future.result()
        else:
            for chunk in chunks:
                yield task(self.config, chunk, *shared)

    def _actor_map(self, task: Callable[..., dict], chunks: list, shared: tuple) -> Iterator[dict]:
        """One chunk at a time per actor; the next goes to whichever actor finishes first."""
        import ray  # optional (the scale extra): only --ray imports it

        refs = [ray.put(x) for x in shared]
        todo = iter(chunks)
        pending: dict = {}

        def give(actor: Any) -> None:
            chunk = next(todo, None)
            if chunk is not None:
                pending[actor.run.remote(task, self.config, chunk, *refs)] = actor

        for actor in self._actors:
            give(actor)
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            give(pending.pop(done))
            yield ray.get(done)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._actors or self._own_ray:
            import ray  # optional (the scale extra): only --ray imports it

            for actor in self._actors:
                ray.kill(actor)
            if self._own_ray:
                ray.shutdown()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


RAY_CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """Refuse a ``--ray HOST:PORT`` (or ``ray://HOST:PORT``) where nothing listens, in seconds: Ray itself
    retries an unreachable cluster for minutes before it gives up. Other forms (``auto``) go to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)", address.strip())
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RequestError("ray", f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                                  "`ray start --head`, or give --ray alone for a local one") from None


def ingest_file(prompts_file: str, uri: str, defaults: dict[str, Any], registry: str | None = None,
                device: str = "auto", dtype: str = "float32", threads: int | None = None, workers: int = 1,
                chunk_size: int | None = None, job_id: str | None = None, ray_address: str | None = None) -> dict:
    """The ``ingest`` command: start the workers (they load the default model meanwhile), plan, prepare
    the store, run every chunk (a bar over chunks on stderr)."""
    lines = read_lines(prompts_file)
    registry = str(Path(registry).resolve()) if registry else None  # workers may start elsewhere
    config = WorkerConfig(uri, registry, device, dtype, threads)
    models = (defaults["model_id"],) if defaults.get("model_id") else ()
    with Workers(config, workers, ray_address, ray_address is not None, models) as pool:
        loaders = Loaders(Registry.load(registry), device, dtype, threads=threads)
        job, plans = plan_job(loaders, lines, defaults, chunk_size, job_id, pool.size)
        warnings = prepare(uri, job, plans)
        with tqdm(total=len(job.chunks), desc="ingest", unit="chunk", file=sys.stderr) as bar:
            results = _collect(pool.map(ingest_chunk, job.chunks, (job.model_keys, job.sae_keys)), bar.update)
    return {"job": job.job_id, "store": uri, "lines": len(lines), "runs": len(plans), "chunks": len(job.chunks),
            "computed_runs": sum(r["runs"] for r in results), "skipped_chunks": sum(r["skipped"] for r in results),
            "failed_lines": len(job.errors), "line_errors": job.errors, "warnings": warnings}


# -- calibration into a store -----------------------------------------------------------------------

DEFAULT_CORPUS_CHUNK = 64  # documents per corpus chunk: one commit per calibration table each


@dataclass(frozen=True)
class CalibrationSpec:
    """What every corpus chunk of one calibration shares (picklable, as :class:`WorkerConfig`)."""

    model_id: str
    sae_id: str
    hooks: tuple[tuple[int, str], ...]
    calibration_id: int
    sae_keys: tuple[int, ...]  # the store's key of the SAE at each hook


@dataclass
class CorpusChunk:
    """Documents ``first``.. of the corpus, committed as one append per table with ``marker``."""

    index: int
    marker: str
    first: int
    docs: list[str]


def calibrate_chunk(config: WorkerConfig, chunk: CorpusChunk, spec: CalibrationSpec) -> dict:
    """The codes of one corpus chunk (:func:`ingest.run.calibration_batches`, as a local calibration
    computes them), committed with the calibration's id; safe to retry (skipped by its marker)."""
    if store.chunk_done(config.store, chunk.marker, store.CORPUS_CHUNK_ORDER[-1]):
        return {"chunk": chunk.index, "docs": 0, "skipped": True}
    loaders = _loaders(config)
    loaded = loaders.model(loaders.entry(spec.model_id))
    source = loaders.source(spec.sae_id)
    saes = [source.load(layer, stream).to(loaded.device) for layer, stream in spec.hooks]
    tokens, acts = calibration_batches(loaded, saes, list(spec.hooks), chunk.docs)
    cal = spec.calibration_id
    tokens = _in_corpus(tokens, chunk.first, cal)
    acts = _in_corpus(with_sae_keys(acts, [np.asarray(spec.sae_keys, np.int32)], [acts.num_rows]), chunk.first, cal)
    store.commit_chunk(config.store, chunk.marker, {"calibration_tokens": tokens, "calibration_activations": acts},
                       store.CORPUS_CHUNK_ORDER)
    return {"chunk": chunk.index, "docs": len(chunk.docs), "skipped": False}


def _in_corpus(rows: pa.Table, first: int, calibration_id: int) -> pa.Table:
    """A chunk's rows with their document numbered in the whole corpus, and the calibration's id."""
    rows = rows.set_column(rows.column_names.index("doc"), "doc", pc.add(rows["doc"], pa.scalar(first, pa.int32())))
    return rows.append_column("calibration_id", pa.array(np.full(rows.num_rows, calibration_id, np.int32)))


def calibrate_store(uri: str, loaders: Loaders, model_id: str, sae_id: str, corpus: str, hooks: list[tuple[int, str]],
                    registry: str | None = None, lite_labels: bool = True, workers: int = 1,
                    ray_address: str | None = None, chunk_docs: int | None = None, progress: bool = True
                    ) -> dict:
    """``calibrate --store``: the corpus cut into chunks whose codes workers compute and commit (this
    process, ``workers`` processes, or Ray actors), then the statistics in SQL over the store
    (:func:`catalog.store.calibration_statistics`) and the lite labels (decoder tokens computed here),
    committed with the ``calibrations`` row last. The job id is a hash of the model, SAEs, corpus and
    chunk size, so the same command resumes a killed job (committed chunks are skipped). Returns what
    a local calibration returns."""
    chunk_docs = chunk_docs or DEFAULT_CORPUS_CHUNK
    if ray_address is not None:  # Ray there and its cluster answering, before the store is written
        import ray  # noqa: F401  optional (the scale extra): a missing one is the CLI's one-line error

        if ray_address != "local":
            _check_reachable(ray_address)
    entry, source = loaders.entry(model_id), loaders.source(sae_id)
    card = loaders.card(entry)
    check_hooks(model_id, card.n_layers, hooks)
    docs, infos = read_corpus(corpus), sae_infos(source, hooks)
    corpus_hash = file_fingerprint(Path(corpus))
    job_id = "calibration-" + hashlib.sha256(json.dumps(
        [model_id, card.fingerprint, [i.fingerprint for i in infos], hooks, corpus_hash, chunk_docs]).encode()).hexdigest()[:16]
    store.create_tables(uri)
    model_keys = _register_models(uri, job_id, {model_id: card})
    sae_keys = _register(uri, job_id, "sae", "saes", ("sae_id", "layer", "stream", "fingerprint"),
                         {(i.sae_id, i.layer, i.stream, i.fingerprint): asdict(i) for i in infos})
    keys = tuple(sae_keys[(i.sae_id, i.layer, i.stream, i.fingerprint)] for i in infos)
    spec = CalibrationSpec(model_id, sae_id, tuple(hooks), _job_keys(uri, job_id, "calibration", 1), keys)
    chunks = [CorpusChunk(i, f"{job_id}:chunk-{i}", start, docs[start:start + chunk_docs])
              for i, start in enumerate(range(0, len(docs), chunk_docs))]
    config = WorkerConfig(uri, registry, loaders.device, loaders.dtype, loaders.threads)
    with tqdm(total=len(chunks), desc="calibrate", unit="chunk", file=sys.stderr, disable=not progress) as bar:
        run_tasks(calibrate_chunk, config, chunks, (spec,), workers, ray_address, ray_address is not None, bar.update)
    cal = spec.calibration_id
    n_tokens, feature_stats, fires = store.calibration_statistics(uri, cal, zip(keys, (i.d_sae for i in infos), strict=True))
    labels = _lite_labels(loaders, entry, source, hooks, keys, fires, cal) if lite_labels else None
    store.commit_calibration(uri, f"{job_id}:statistics", {
        "calibration_saes": pa.table({"calibration_id": pa.array([cal] * len(keys), pa.int32()),
                                      "sae_key": pa.array(keys, pa.int32())}),
        "feature_stats": feature_stats, **({"labels": labels} if labels is not None else {}),
        "calibrations": pa.Table.from_pylist([{
            "calibration_id": cal, "model_key": model_keys[(model_id, card.fingerprint)], "corpus": str(corpus),
            "corpus_hash": corpus_hash, "n_docs": len(docs), "n_tokens": n_tokens, "created_at": datetime.now()}])})
    snapshot = store.StoreCatalog(uri)
    try:
        warnings = stability_warnings(stats.thin_features(snapshot, cal), n_tokens)
    finally:
        snapshot.close()
    return {"calibration_id": cal, "n_docs": len(docs), "n_tokens": n_tokens, "hooks": [list(h) for h in hooks],
            "warnings": warnings, "job": job_id, "chunks": len(chunks)}


def _lite_labels(loaders: Loaders, entry: Any, source: Any, hooks: list[tuple[int, str]], keys: tuple[int, ...],
                 fires: dict[int, dict[int, list[str]]], calibration_id: int) -> pa.Table:
    """The lite labels of the calibration's SAEs (decoder tokens through this process's model), each
    with ``calibration_id``: they belong to this calibration (its model's tokens), as in a local catalog."""
    loaded = loaders.model(entry)
    parts = []
    for (layer, stream), key in zip(hooks, keys, strict=True):
        rows = stats.lite_label_rows(fires[key], *decoder_tokens(loaded, source.load(layer, stream).to(loaded.device)))
        parts.append(rows.append_column("sae_key", pa.array(np.full(rows.num_rows, key, np.int32))))
    labels = pa.concat_tables(parts)
    labels = labels.append_column("calibration_id", pa.array(np.full(labels.num_rows, calibration_id, np.int32)))
    return labels.append_column("created_at", pa.array([datetime.now()] * labels.num_rows, pa.timestamp("us")))
