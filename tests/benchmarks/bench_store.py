"""Store benchmarks (issue 18) — run on demand, never by the test command (pytest ignores tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_store.py [--prompts 16] [--reps 2] [--commits 100] [--queries 15]
                                                      [--chunk_size N] [--variants batch_w2,store_ray_w2]
                                                      [--ray_cluster]

(a) Delta commit rate: ``--commits`` small appends with a transaction marker (``catalog.store.append``,
    as a chunk commits each table), one after another from one process: commits per second, and per
    commit the marker check and the write.
(b) Ingest of ``--prompts`` demo documents (text mode, the demo's default layer), end to end as a user
    runs it (a fresh process each time: model load, startup and commits included): local batch mode
    into a DuckDB file with one worker and with ``--workers 2`` (today's process pool), and
    ``ingest --store`` with ``--ray --workers 2`` and with ``--workers 2`` (no Ray), at the default
    chunk size unless ``--chunk_size`` is given (``--variants`` runs only some of them, e.g. the Ray
    pair at larger ``--prompts``). Activation rows per second; ratios paired per repetition (the
    variants of one repetition run back to back).
    ``--ray_cluster`` starts a Ray head once (``ray start --head --num-cpus 2``, its own temp dir and
    process group), before the timed rounds, and gives the Ray variant its address (``--ray ADDRESS``:
    the usual deployment, a cluster that is already running); the cluster is stopped at the end (its
    process group, never ``ray stop``, which stops every Ray on the machine).
(c) Per-run query: ``runs rank``'s ranking SQL (``sae_discover.stored.rerank``) on one run, on the
    local file and on the (compacted) store snapshot, interleaved; median of ``--queries`` calls each.

Every worker runs torch with one thread (``--threads 1``), so two workers use the two cores. The
load average is printed before and after: on a shared machine the figures are the wait for a core
as much as the work, so compare the paired ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from catalog import store  # noqa: E402
from catalog.db import Catalog  # noqa: E402
from sae_discover.registry import DEMO_DIR  # noqa: E402
from sae_discover.stored import rerank  # noqa: E402

COMMON = ["--model", "demo", "--sae", "demo", "--device", "cpu", "--threads", "1"]
VARIANTS = {  # name → the command's arguments besides the prompts file and its target
    "batch_w1": ["--workers", "1"],
    "batch_w2": ["--workers", "2"],
    "store_ray_w2": ["ingest", "--ray", "--workers", "2"],
    "store_pool_w2": ["ingest", "--workers", "2"],
}


class RayCluster:
    """A Ray head started with ``ray start --head`` as the leader of a new process group (its GCS,
    raylet and workers stay in that group after ``ray start`` returns), stopped by signalling that group."""

    def __init__(self, cpus: int = 2) -> None:
        self.temp = tempfile.mkdtemp(prefix="rb-")  # short: Ray's socket paths live under it
        start = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus", str(cpus), "--port", "0",
             "--temp-dir", self.temp, "--include-dashboard=false", "--disable-usage-stats"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            # a private, short-lived head: without RAY_AUTH_MODE, `ray start` turns on token auth when
            # ~/.ray/auth_token exists, and a driver joining by address is then refused
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"})
        self.group = start.pid
        out, _ = start.communicate()
        if start.returncode != 0:
            self.stop()
            raise SystemExit(f"ray start failed:\n{out[-3000:]}")
        self.address = (Path(self.temp) / "ray_current_cluster").read_text().strip()

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(self.group, sig)
            except ProcessLookupError:
                break
            time.sleep(wait)
        shutil.rmtree(self.temp, ignore_errors=True)


def commit_rate(folder: Path, commits: int) -> dict:
    """Small appends to one Delta table, each with its own marker (checked first, as a chunk's are)."""
    uri = str(folder / "commits")
    store.create_tables(uri)
    rows = pa.table({"run_key": pa.array([1], pa.int32()), "key": ["k"], "value": ["v"]})
    check, write = [], []
    for i in range(commits):
        t0 = time.perf_counter()
        assert store.open_table(uri, "run_tags").transaction_version(f"bench:chunk-{i}") is None
        t1 = time.perf_counter()
        store.append(uri, "run_tags", rows, f"bench:chunk-{i}")
        write.append(time.perf_counter() - t1)
        check.append(t1 - t0)
    total = sum(check) + sum(write)
    return {"commits": commits, "commits_per_s": commits / total, "median_check_ms": 1e3 * statistics.median(check),
            "median_append_ms": 1e3 * statistics.median(write)}


def prompts_file(folder: Path, n: int) -> Path:
    """The first ``n`` documents of the demo's calibration corpus as text-mode lines; past the corpus's
    600, its documents again with a numbered suffix (distinct texts: repeated lines would be one run)."""
    corpus = [json.loads(line)["text"] for line in (DEMO_DIR / "calibration.jsonl").read_text().splitlines()]
    docs = [corpus[i % len(corpus)] + (f" ({i // len(corpus)})" if i >= len(corpus) else "") for i in range(n)]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    return path


def ingest_once(name: str, prompts: Path, target: Path, chunk_size: int | None = None,
                ray_address: str | None = None) -> float:
    """One variant end to end in a fresh process (the Ray variant joins ``ray_address`` when given); its
    wall time."""
    args = list(VARIANTS[name])
    if ray_address and "--ray" in args:
        args.insert(args.index("--ray") + 1, ray_address)
    if args[0] == "ingest":
        chunks = ["--chunk_size", str(chunk_size)] if chunk_size else []
        cmd = [*args, "--prompts_file", str(prompts), "--store", str(target), *chunks]
    else:
        cmd = [*args, "--prompts_file", str(prompts), "--db", str(target), "--out", str(target.with_suffix(".jsonl"))]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sae_discover", *cmd, *COMMON], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return elapsed


def activation_rows(target: Path) -> int:
    catalog = store.StoreCatalog(str(target)) if target.is_dir() else Catalog(target, read_only=True)
    try:
        return catalog.raw().execute("SELECT count(*) FROM v_activations").fetchone()[0]
    finally:
        catalog.close()


def ingest_rates(folder: Path, n: int, reps: int, chunk_size: int | None = None,
                 variants: tuple[str, ...] = tuple(VARIANTS), ray_address: str | None = None) -> tuple[dict, Path, Path]:
    prompts = prompts_file(folder, n)
    times: dict[str, list[float]] = {name: [] for name in variants}
    rows: dict[str, int] = {}
    for rep in range(reps):
        for name in variants:
            target = folder / f"{name}-{rep}" if VARIANTS[name][0] == "ingest" else folder / f"{name}-{rep}.duckdb"
            times[name].append(ingest_once(name, prompts, target, chunk_size, ray_address))
            rows[name] = activation_rows(target)
    assert len(set(rows.values())) == 1, rows  # every variant stores the same activation rows
    n_rows = next(iter(rows.values()))
    out = {"prompts": n, "chunk_size": chunk_size or "default", "activation_rows": n_rows, "ray": ray_address or "local",
           "rows_per_s": {k: [round(n_rows / t) for t in v] for k, v in times.items()},
           "wall_s": {k: [round(t, 2) for t in v] for k, v in times.items()}}
    for name in ("store_ray_w2", "store_pool_w2", "batch_w1"):  # rows/s relative to batch --workers 2, per repetition
        if name in times and "batch_w2" in times:
            out[f"{name}/batch_w2"] = [round(b / a, 3) for a, b in zip(times[name], times["batch_w2"], strict=True)]
    return out, folder / "batch_w2-0.duckdb", folder / "store_ray_w2-0"


def query_ratio(local_db: Path, uri: Path, calls: int) -> dict:
    store.compact(str(uri), vacuum_hours=0)
    local, shared = Catalog(local_db, read_only=True), store.StoreCatalog(str(uri))
    t_open = time.perf_counter()
    store.StoreCatalog(str(uri)).close()
    t_open = time.perf_counter() - t_open
    try:
        run_id = local.raw().execute("SELECT min(run_id) FROM runs").fetchone()[0]
        lat: dict[str, list[float]] = {"local": [], "store": []}
        for i in range(calls + 1):
            for name, cat in (("local", local), ("store", shared)):
                t0 = time.perf_counter()
                rerank(cat, run_id, {})
                if i:  # the first round warms both
                    lat[name].append(time.perf_counter() - t0)
    finally:
        local.close()
        shared.close()
    med = {k: statistics.median(v) for k, v in lat.items()}
    return {"median_ms": {k: round(1e3 * v, 1) for k, v in med.items()}, "store/local": round(med["store"] / med["local"], 2),
            "snapshot_open_ms": round(1e3 * t_open, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--commits", type=int, default=100)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--chunk_size", type=int, help="runs per chunk of the store's ingest (default: ingest's default)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated ingest variants to run, in this order (batch_w2 and store_ray_w2 are needed "
                        "for the query comparison)")
    p.add_argument("--ray_cluster", action="store_true",
                   help="start a Ray head (ray start --head --num-cpus 2) once, before the timed rounds, and run the Ray "
                        "variant against it (--ray ADDRESS); stopped at the end")
    a = p.parse_args()
    variants = tuple(a.variants.split(","))
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    machine = {"python": platform.python_version(), "cores": os.cpu_count(), "load_before": os.getloadavg()}
    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed bench still stops its Ray head (finally)
    cluster = RayCluster() if a.ray_cluster else None
    try:
        result = {"commit": commit_rate(folder, a.commits)} if a.commits else {}
        result["ingest"], local_db, uri = ingest_rates(folder, a.prompts, a.reps, a.chunk_size, variants,
                                                       cluster.address if cluster else None)
        if a.queries and local_db.exists() and uri.exists():
            result["query"] = query_ratio(local_db, uri, a.queries)
    finally:
        if cluster:
            cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    machine["load_after"] = os.getloadavg()
    print(json.dumps({"machine": machine, **result}, indent=1))


if __name__ == "__main__":
    main()
