"""Worker processes (batch mode with ``--workers N``): each loads the model and SAEs once and runs micro-batches.

:func:`pool_runs` spreads jobs over spawned processes and yields their outcomes as they finish; the
calling process stays the one writer of the catalog.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from ingest.errors import IngestError
from ingest.models import load_model, quiet_transformers
from ingest.run import RunBatch, RunSpec, run_many
from ingest.saes.sources import open_source
from ingest.threads import apply_threads

# one micro-batch: (model_id, model source, sae_id, SAE root, hooks, specs), :func:`pool_run`'s arguments
PoolJob = tuple[str, str, str, str, list[tuple[int, str]], list[RunSpec]]

_POOL_STATE: dict = {}  # this worker process's device, dtype and threads, and its loaded model and SAE source


def init_worker_process(n_workers: int, device: str, dtype: str, threads: int | None = None) -> None:
    """Split the CPU threads between workers (``ingest.threads``: together never more than the cores);
    give each worker its own GPU where there are several."""
    quiet_transformers()
    apply_threads(threads, None, n_workers)  # until the model is loaded and the rule can size by it
    if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        ident = multiprocessing.current_process()._identity
        device = f"cuda:{(ident[0] - 1) % torch.cuda.device_count() if ident else 0}"
    _POOL_STATE.update(device=device, dtype=dtype, threads=threads, workers=n_workers)


def pool_run(model_id: str, model_source: str, sae_id: str, sae_root: str, hooks: list[tuple[int, str]],
             specs: list[RunSpec]) -> tuple[list[RunBatch], int]:
    """One micro-batch in a worker process: the model and SAEs are loaded once per process and kept."""
    key = (model_source, sae_root)
    if _POOL_STATE.get("key") != key:
        loaded = load_model(model_id, model_source, _POOL_STATE.get("device", "auto"), _POOL_STATE.get("dtype", "float32"))
        _POOL_STATE.update(key=key, loaded=loaded, source=open_source(sae_id, sae_root))
        apply_threads(_POOL_STATE.get("threads"), loaded.model, _POOL_STATE.get("workers", 1))
    loaded, source = _POOL_STATE["loaded"], _POOL_STATE["source"]
    saes = [source.load(layer, stream).to(loaded.device) for layer, stream in hooks]
    return run_many(loaded, saes, specs), loaded.d_model


def pool_runs(jobs: Sequence[PoolJob], workers: int, device: str, dtype: str,
              user_errors: tuple[type[Exception], ...] = (IngestError,), threads: int | None = None
              ) -> Iterator[tuple[int, tuple[list[RunBatch], int] | Exception]]:
    """Run every job in ``workers`` spawned processes; yield ``(job index, (outputs, d_model))`` as each
    finishes, or ``(job index, error)`` for an error of ``user_errors`` (any other error propagates).
    ``threads`` is the torch thread count of all workers together (None: ``ingest.threads``' rule)."""
    ctx = multiprocessing.get_context("spawn")  # fork would copy a parent's CUDA and thread-pool state
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker_process,
                             initargs=(workers, device, dtype, threads)) as pool:
        futures = {pool.submit(pool_run, *job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            try:
                outcome: tuple[list[RunBatch], int] | Exception = future.result()
            except user_errors as exc:
                outcome = exc
            yield futures[future], outcome
