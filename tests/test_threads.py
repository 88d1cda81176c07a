"""Torch CPU threads (issue 13): ``--threads N`` sets them, the default follows the model's size, and
worker processes split the count so that together they never run more threads than there are cores."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from ingest.threads import MAX_DEFAULT_THREADS, SMALL_MODEL_PARAMS, available_cores, resolve_threads
from tests.conftest import ROOT, run_cli

CORES = available_cores()
SMALL, LARGE = 1_500_000, 124_000_000  # the demo's parameters; GPT-2 small's
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="a thread count other than 1 needs two cores")


def test_the_default_follows_the_model_size():
    assert resolve_threads(None, SMALL, cores=16) == 1
    assert resolve_threads(None, SMALL_MODEL_PARAMS - 1, cores=16) == 1
    assert resolve_threads(None, LARGE, cores=16) == MAX_DEFAULT_THREADS
    assert resolve_threads(None, LARGE, cores=2) == 2
    assert resolve_threads(None, None, cores=3) == 3  # size not yet known: the larger models' rule


def test_larger_models_take_only_the_idle_cores():
    assert resolve_threads(None, LARGE, cores=8, load=0.2) == MAX_DEFAULT_THREADS
    assert resolve_threads(None, LARGE, cores=8, load=6.4) == 2  # 8 cores, about 6 busy
    assert resolve_threads(None, LARGE, cores=2, load=10.5) == 1  # every core busy: never 0
    assert resolve_threads(None, SMALL, cores=8, load=0.0) == 1  # small models: one thread regardless
    assert resolve_threads(2, LARGE, cores=2, load=10.5) == 2  # an explicit count wins


def test_an_explicit_count_wins_but_never_exceeds_the_cores():
    assert resolve_threads(3, SMALL, cores=16) == 3
    assert resolve_threads(8, LARGE, cores=2) == 2


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("requested", [None, 1, 2, 5, 64])
def test_workers_split_the_threads_and_never_oversubscribe(cores, workers, requested):
    each = resolve_threads(requested, LARGE, workers, cores)
    total = min(requested or MAX_DEFAULT_THREADS, cores)
    assert each == max(1, total // workers)
    if workers <= cores:
        assert workers * each <= cores


def _cli_threads(*args: str) -> tuple[subprocess.CompletedProcess, int | None]:
    """The real CLI in a fresh interpreter, then that process's torch thread count."""
    code = ("import sys, torch; from sae_discover.cli import main; rc = main(sys.argv[1:]); "
            "print('THREADS', torch.get_num_threads()); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("THREADS ")), None)
    return proc, int(line.split()[1]) if line else None


@needs_two_cores
def test_cli_threads_flag_and_default(toy_registry, tmp_path):
    base = ["--registry", str(toy_registry), "--db", str(tmp_path / "c.duckdb"), "--model", "toy", "--sae", "toy"]
    proc, threads = _cli_threads(*base, "--text", "Shares of Hooli fell 9%.", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert threads == 2  # the flag, although the rule would give this small model 1
    proc, threads = _cli_threads(*base, "--text", "Revenue of Globex rose.")  # another text: the model runs again
    assert proc.returncode == 0, proc.stderr
    assert threads == 1  # the default for a small model, where torch's own would be one per core


def test_cli_refuses_a_thread_count_out_of_range(tmp_path):
    for bad in ("0", str(CORES + 1)):
        proc = run_cli("--text", "x", "--db", str(tmp_path / "c.duckdb"), "--threads", bad)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"error: threads: expected an integer in [1, {CORES}] (the CPU cores this "
                                       f"process may use), got {bad}")
    proc = run_cli("serve", "--threads", "0", "--db", str(tmp_path / "c.duckdb"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: threads: expected an integer in [1, ")


def _worker_threads_after(job: tuple | None) -> int:
    """In a pool worker: run ``job`` (a demo micro-batch) if given, then report the torch threads."""
    import torch

    from ingest.pool import pool_run

    if job is not None:
        pool_run(*job)
    return torch.get_num_threads()


@needs_two_cores
@pytest.mark.parametrize(("workers", "threads", "expected"), [(1, 2, 2), (2, 2, 1), (2, None, 1)])
def test_pool_workers_get_their_share(toy_demo, workers, threads, expected):
    from ingest.pool import init_worker_process
    from ingest.run import RunSpec

    job = ("toy", str(toy_demo / "model"), "toy", str(toy_demo / "saes"), [(1, "resid_pre")],
           [RunSpec(text="Shares of Hooli fell 9%.", hooks=[(1, "resid_pre")])])
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=init_worker_process,
                             initargs=(workers, "cpu", "float32", threads)) as pool:
        at_start = pool.submit(_worker_threads_after, None).result()
        after_load = pool.submit(_worker_threads_after, job).result()
    assert at_start == max(1, min(threads or MAX_DEFAULT_THREADS, CORES) // workers)
    assert after_load == expected  # explicit: the share; default: the small model's 1
