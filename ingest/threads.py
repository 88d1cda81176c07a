"""How many CPU threads torch uses: one rule, applied where a model is used (CLI, server, worker processes).

Torch's default, one intra-op thread per core, costs far more than it gains on the small models this
tool often runs (the demo, tiny test models): each op is too small to split, and on a busy machine
the threads wait for each other's cores. ``--threads N`` (CLI and ``serve``) sets the count; without
it the rule below picks one from the model's size. Worker processes split the count between them, so
N workers never run more threads together than the cores this process may use. The measurements
behind the rule are in README's Performance section (``tests/benchmarks/bench_threads.py``).
"""

from __future__ import annotations

import os

SMALL_MODEL_PARAMS = 50_000_000  # below this many parameters one thread is the default
MAX_DEFAULT_THREADS = 4  # the default for larger models: the cores, at most this many


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def resolve_threads(requested: int | None, n_params: int | None, workers: int = 1, cores: int | None = None,
                    load: float | None = None) -> int:
    """Torch threads for each of ``workers`` processes running a model of ``n_params`` parameters.

    ``requested`` (``--threads``) is the total for all workers, at most ``cores``; without it, a model
    below ``SMALL_MODEL_PARAMS`` gets 1 thread and a larger (or not yet known) one ``min(cores,
    MAX_DEFAULT_THREADS)`` — of the cores not busy now when the machine's ``load`` (1-minute load
    average) is known: a thread waiting for a busy core costs far more than a free core gains.
    Each worker gets ``max(1, total // workers)``.
    """
    cores = cores or available_cores()
    if requested is not None:
        total = min(requested, cores)
    elif n_params is not None and n_params < SMALL_MODEL_PARAMS:
        total = 1
    else:
        idle = cores if load is None else max(1, cores - round(load))
        total = min(idle, MAX_DEFAULT_THREADS)
    return max(1, total // max(1, workers))


def machine_load() -> float | None:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def apply_threads(requested: int | None, model=None, workers: int = 1) -> int:
    """Set this process's torch threads by :func:`resolve_threads` for ``model`` (an ``nn.Module``, or None
    before one is loaded); return the count."""
    import torch  # deferred: the CLI checks --threads (available_cores) without loading torch

    n_params = sum(p.numel() for p in model.parameters()) if model is not None else None
    count = resolve_threads(requested, n_params, workers, load=machine_load())
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
