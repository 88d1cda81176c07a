"""The shared Delta store (issue 18): distributed ingest commits each chunk once, readers never see a
partial run, and the same SQL (public views, ranking) answers over the store and a local catalog."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("deltalake")  # the scale extra: skipped without it (.ci/run requires it: tests/conftest.py)

from catalog import store
from catalog.db import Catalog
from ingest.models import read_card
from sae_discover import distributed
from sae_discover.drift import drift_report
from sae_discover.loaders import Loaders
from sae_discover.plan import plan_run
from sae_discover.registry import Registry
from sae_discover.stored import rerank
from tests.conftest import ROOT, run_cli

LINES = [
    {"id": "a", "text": "Shares of Globex rose 12% after the earnings call."},
    {"id": "b", "prompt": "The forecast for Boston calls for", "gen_tokens": 6, "seed": 3},
    {"id": "c", "text": "Preheat the oven to 350 degrees and bake the apple pie.", "tags": {"topic": "food"}},
    {"id": "d", "prompt": "In Python, a list comprehension", "gen_tokens": 5},
    {"id": "e", "text": "The patient presented with fever."},
    {"id": "a-again", "text": "Shares of Globex rose 12% after the earnings call."},  # the same run as "a"
    {"id": "f", "text": "Quarterly revenue beat expectations."},
]
OPTIONS = {"model_id": "toy", "sae_id": "toy", "layers": [0, 1]}
CLI_OPTIONS = ["--model", "toy", "--sae", "toy", "--layers", "0", "1", "--device", "cpu"]
ACTS_SQL = "SELECT run_id, position, layer, stream, feature_id, act, attr FROM v_activations ORDER BY ALL"
TOKENS_SQL = "SELECT run_id, position, token_id, token, kept, proxy FROM v_tokens ORDER BY ALL"


@pytest.fixture(scope="module")
def plain_registry(toy_demo, tmp_path_factory):
    """No calibration corpus: both stores rank uncalibrated, and no process calibrates on first use."""
    reg = tmp_path_factory.mktemp("store-reg") / "reg.toml"
    reg.write_text(f'[models.toy]\npath = "{toy_demo / "model"}"\n[saes.toy]\npath = "{toy_demo / "saes"}"\n')
    return reg


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("store-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return path


@pytest.fixture(scope="module")
def local_batch(plain_registry, prompts, tmp_path_factory):
    """The same prompts through local batch mode (the oracle)."""
    db = tmp_path_factory.mktemp("store-local") / "local.duckdb"
    done = run_cli("--prompts_file", str(prompts), "--db", str(db), "--registry", str(plain_registry), *CLI_OPTIONS,
                   "--out", str(db.with_suffix(".jsonl")))
    assert done.returncode == 0, done.stderr
    return db


def _rows(catalog: Catalog, sql: str) -> list[tuple]:
    con = catalog.raw()
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _ranked(catalog: Catalog, run_id: str) -> list[tuple]:
    result = rerank(catalog, run_id, {"min_coverage_pct": 0})
    return [(f["layer"], f["stream"], f["feature_id"], pytest.approx(f["score"], rel=1e-5),
             pytest.approx(f["scores"]["coverage"], rel=1e-5)) for f in result["features"]]


def _same_acts(a: Catalog, b: Catalog) -> None:
    """Equal activation and token rows; float values (act, proxy) to rounding: chunks micro-batch the
    model differently than local batch mode does, and a batched forward equals a single one to
    rounding (tests/test_batch.py)."""
    for sql, n_exact in ((ACTS_SQL, 5), (TOKENS_SQL, 5)):
        rows_a, rows_b = _rows(a, sql), _rows(b, sql)
        assert [r[:n_exact] for r in rows_a] == [r[:n_exact] for r in rows_b] and len(rows_a) > 100
        assert np.allclose([r[n_exact] for r in rows_a], [r[n_exact] for r in rows_b], rtol=1e-5, atol=1e-6)


def _job(registry, uri, chunk_size=2):
    loaders = Loaders(Registry.load(str(registry)), "cpu")
    job, plans = distributed.plan_job(loaders, list(enumerate(LINES, 1)), OPTIONS, chunk_size)
    distributed.prepare(str(uri), job, plans)
    return job, distributed.WorkerConfig(str(uri), str(registry), "cpu")


def test_cli_ingest_gives_local_batch_rows_run_ids_and_rankings(plain_registry, prompts, local_batch, tmp_path):
    uri = tmp_path / "store"
    done = run_cli("ingest", "--prompts_file", str(prompts), "--store", str(uri), "--registry", str(plain_registry),
                   "--chunk_size", "2", *CLI_OPTIONS)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["runs"], summary["chunks"], summary["computed_runs"]) == (6, 3, 6)  # "a-again" is run "a"
    local, shared = Catalog(local_batch, read_only=True), store.StoreCatalog(str(uri))
    try:
        run_ids = [r[0] for r in _rows(local, "SELECT run_id FROM v_runs ORDER BY run_id")]
        assert [r[0] for r in _rows(shared, "SELECT run_id FROM v_runs ORDER BY run_id")] == run_ids
        _same_acts(shared, local)
        tags = "SELECT run_id, batch_id, tags FROM v_runs ORDER BY run_id"
        assert _rows(shared, tags) == _rows(local, tags)
        for run_id in run_ids:  # the ranking SQL, one text over both stores
            assert _ranked(shared, run_id) == _ranked(local, run_id)
    finally:
        local.close()
        shared.close()
    again = run_cli("ingest", "--prompts_file", str(prompts), "--store", str(uri), "--registry", str(plain_registry),
                    "--chunk_size", "2", *CLI_OPTIONS)  # the same command resumes the job: nothing left to do
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped_chunks"] == 3
    # another job gives stored runs tags and batch ids: new keys are added, a stored value is kept (warned)
    relabel = tmp_path / "relabel.jsonl"
    relabel.write_text("".join(json.dumps(line) + "\n" for line in [
        {"id": "c2", "text": LINES[2]["text"], "tags": {"topic": "baking", "source": "relabel"}},
        {"text": LINES[4]["text"], "tags": {"source": "relabel"}}]))
    labelled = run_cli("ingest", "--prompts_file", str(relabel), "--store", str(uri), "--registry", str(plain_registry),
                       *CLI_OPTIONS)
    assert labelled.returncode == 0, labelled.stderr
    summary = json.loads(labelled.stdout.strip().splitlines()[-1])
    assert summary["computed_runs"] == 0 and len(summary["warnings"]) == 2
    assert "warning: tags: run " in labelled.stderr and "topic=food; kept (not baking" in labelled.stderr
    assert "warning: id: run " in labelled.stderr and "batch id c; kept (not c2" in labelled.stderr
    relabelled = store.StoreCatalog(str(uri))
    try:
        by_text = {text: (batch_id, tags) for text, batch_id, tags in _rows(
            relabelled, "SELECT coalesce(text, prompt), batch_id, tags FROM v_runs")}
    finally:
        relabelled.close()
    assert by_text[LINES[2]["text"]] == ("c", {"topic": "food", "source": "relabel"})
    assert by_text[LINES[4]["text"]] == ("e", {"source": "relabel"})
    again = run_cli("ingest", "--prompts_file", str(relabel), "--store", str(uri), "--registry", str(plain_registry),
                    *CLI_OPTIONS)  # the same labels again: nothing more is appended
    assert again.returncode == 0 and store.open_table(str(uri), "run_tags").to_pyarrow_table().num_rows == 3
    rank = run_cli("runs", "rank", run_ids[0][:8], "--store", str(uri), "--min_coverage_pct", "0", "--out",
                   str(tmp_path / "r.json"))
    assert rank.returncode == 0, rank.stderr
    assert json.loads((tmp_path / "r.json").read_text())["run_id"] == run_ids[0]
    refused = run_cli("sql", "--store", str(uri), "CREATE TABLE x AS SELECT 1")
    assert refused.returncode == 2 and "write statements are refused" in refused.stderr


def test_sixty_four_prompts_over_two_workers_give_local_batch_rows_and_rankings(plain_registry, tmp_path):
    """The issue's size: 64 prompts (texts and seeded prompt+gen lines) ingested by two worker processes
    with the default chunking give exactly local batch mode's run ids, rows and rankings."""
    subjects = ["Globex shares", "The striker", "The soup", "The parser", "The storm front", "The patient"]
    lines = []
    for i in range(64):
        subject = subjects[i % len(subjects)]
        lines.append({"id": f"p{i}", "text": f"{subject} number {i} changed course on day {i % 7}."} if i % 2 else
                     {"id": f"p{i}", "prompt": f"{subject} on day {i}", "gen_tokens": 4, "seed": i})
    prompts = tmp_path / "p64.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    db = tmp_path / "local.duckdb"
    local_run = run_cli("--prompts_file", str(prompts), "--db", str(db), "--registry", str(plain_registry),
                        *CLI_OPTIONS, "--out", str(tmp_path / "local.jsonl"))
    assert local_run.returncode == 0, local_run.stderr
    uri = tmp_path / "store"
    done = run_cli("ingest", "--prompts_file", str(prompts), "--store", str(uri), "--registry", str(plain_registry),
                   "--workers", "2", *CLI_OPTIONS)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["runs"], summary["computed_runs"]) == (64, 64) and summary["chunks"] >= 4
    local, shared = Catalog(db, read_only=True), store.StoreCatalog(str(uri))
    try:
        run_ids = [r[0] for r in _rows(local, "SELECT run_id FROM v_runs ORDER BY run_id")]
        assert len(run_ids) == 64
        assert [r[0] for r in _rows(shared, "SELECT run_id FROM v_runs ORDER BY run_id")] == run_ids
        _same_acts(shared, local)
        for run_id in run_ids[::8]:
            assert _ranked(shared, run_id) == _ranked(local, run_id)
    finally:
        local.close()
        shared.close()


def test_a_killed_chunk_is_never_partial_and_the_resumed_job_completes_it_once(plain_registry, local_batch, tmp_path):
    uri = tmp_path / "store"
    job, config = _job(plain_registry, uri)
    first = distributed.ingest_chunk(config, job.chunks[0], job.model_keys, job.sae_keys)
    assert first == {"chunk": 0, "runs": 2, "skipped": False}
    # chunk 1's worker dies after committing its children, before its runs rows (the commit point)
    loaders = distributed._loaders(config)
    todo = [(key, plan_run(loaders, req)) for key, req in job.chunks[1].items]
    tables = distributed.chunk_tables(loaders, todo, job.model_keys, job.sae_keys)
    for name in ("run_saes", "tokens", "activations"):
        assert store.append(str(uri), name, tables[name], job.chunks[1].marker)
    snapshot = store.StoreCatalog(str(uri))
    try:
        visible = {r[0] for r in _rows(snapshot, "SELECT run_key FROM runs")}
        assert visible == {key for key, _ in job.chunks[0].items}
        for table in ("tokens", "activations", "run_saes"):  # no row of the dead chunk is seen
            assert {r[0] for r in _rows(snapshot, f"SELECT DISTINCT run_key FROM {table}")} == visible
    finally:
        snapshot.close()
    # the resumed job: chunk 0 skipped by its marker, chunk 1's committed tables skipped, the rest computed
    results = distributed.run_job(job, config)
    assert [(r["chunk"], r["skipped"]) for r in results] == [(0, True), (1, False), (2, False)]
    assert not store.commit_chunk(str(uri), job.chunks[1].marker, tables)  # a retry of a done chunk: skipped
    local, shared = Catalog(local_batch, read_only=True), store.StoreCatalog(str(uri))
    try:
        _same_acts(shared, local)  # exactly one copy of every run
        assert _rows(shared, "SELECT count(*), count(DISTINCT run_id) FROM runs") == [(6, 6)]
        _whole_runs_at_every_version(uri, local)
    finally:
        local.close()
        shared.close()


def _whole_runs_at_every_version(uri, local: Catalog) -> None:
    """A reader pinned at any version of ``runs`` sees only whole runs: each visible run has local batch
    mode's activation and token counts, and no row of a run that is not visible is seen."""
    per_run = "SELECT run_id, count(*) FROM v_activations GROUP BY run_id ORDER BY run_id"
    tokens = "SELECT r.run_id, r.n_tokens, count(t.position) FROM runs r LEFT JOIN tokens t USING (run_key) GROUP BY ALL"
    expected = dict(_rows(local, per_run))
    for version in range(store.open_table(str(uri), "runs").version() + 1):
        pinned = store.StoreCatalog(str(uri), runs_version=version)
        try:
            visible = _rows(pinned, per_run)
            assert all(expected[rid] == n for rid, n in visible)
            assert len(_rows(pinned, "SELECT * FROM activations")) == sum(n for _, n in visible)
            assert all(n_tokens == n for _, n_tokens, n in _rows(pinned, tokens))
        finally:
            pinned.close()


def test_sigkill_of_the_driver_mid_job_then_rerun_gives_one_copy_of_every_run(plain_registry, prompts, local_batch,
                                                                               tmp_path):
    uri = tmp_path / "store"
    args = [sys.executable, "-m", "sae_discover", "ingest", "--prompts_file", str(prompts), "--store", str(uri),
            "--registry", str(plain_registry), "--chunk_size", "1", *CLI_OPTIONS]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    runs_log = uri / "runs" / "_delta_log"
    while time.time() < deadline and proc.poll() is None:  # kill once the first chunks are committed
        if runs_log.is_dir() and len(list(runs_log.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = run_cli("ingest", "--prompts_file", str(prompts), "--store", str(uri), "--registry", str(plain_registry),
                   "--chunk_size", "1", *CLI_OPTIONS)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped_chunks"] >= 1 and summary["computed_runs"] < 6  # only what was missing
    local, shared = Catalog(local_batch, read_only=True), store.StoreCatalog(str(uri))
    try:
        _same_acts(shared, local)
        assert _rows(shared, "SELECT count(*) FROM runs") == [(6,)]
    finally:
        local.close()
        shared.close()


def test_import_and_compact_keep_every_answer(plain_registry, local_batch, tmp_path):
    uri = tmp_path / "store"
    job, config = _job(plain_registry, uri, chunk_size=1)
    distributed.run_job(job, config)
    db = tmp_path / "imported.duckdb"
    done = run_cli("store", "import", str(uri), "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"runs": 6, "created": 6}
    before = store.StoreCatalog(str(uri))
    compacted = run_cli("store", "compact", str(uri), "--retention_hours", "0")
    assert compacted.returncode == 0, compacted.stderr
    assert json.loads(compacted.stdout)["activations"]["files_removed"] == 6  # one file per chunk, now one
    after, imported, local = store.StoreCatalog(str(uri)), Catalog(db, read_only=True), Catalog(local_batch, read_only=True)
    try:
        for sql in (ACTS_SQL, TOKENS_SQL, "SELECT run_id, batch_id, tags FROM v_runs ORDER BY run_id"):
            assert _rows(after, sql) == _rows(imported, sql)
        _same_acts(after, local)
        run_id = _rows(local, "SELECT min(run_id) FROM runs")[0][0]
        assert _ranked(imported, run_id) == _ranked(after, run_id) == _ranked(local, run_id)
        assert len(store.open_table(str(uri), "activations").file_uris()) == 1
        del before  # pinned before compaction: its files were vacuumed (retention 0), as the flag says
    finally:
        for cat in (after, imported, local):
            cat.close()
    filtered = tmp_path / "filtered.duckdb"
    done = run_cli("store", "import", str(uri), "--db", str(filtered), "--where", "batch_id = 'c'")
    assert json.loads(done.stdout) == {"runs": 1, "created": 1}


def test_ray_tasks_commit_the_same_rows(plain_registry, local_batch, tmp_path):
    ray = pytest.importorskip("ray")
    uri = tmp_path / "store"
    job, config = _job(plain_registry, uri, chunk_size=3)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = distributed.run_job(job, config, workers=2, use_ray=True)
    finally:
        ray.shutdown()
    assert sorted(r["runs"] for r in results) == [3, 3]
    local, shared = Catalog(local_batch, read_only=True), store.StoreCatalog(str(uri))
    try:
        _same_acts(shared, local)
    finally:
        local.close()
        shared.close()


def _claimed(pauses, point: str, running, deadline: float) -> tuple[int, int]:
    """The (pid, chunk) of the Ray worker paused at ``point`` (:func:`distributed.pause_point`)."""
    while time.time() < deadline:
        found = list(pauses.glob(f"{point}.*"))
        if found:
            _, pid, chunk = found[0].name.rsplit(".", 2)
            return int(pid), int(chunk)
        assert not running.done(), running.result()  # the job ended (or failed) without reaching the point
        time.sleep(0.05)
    raise AssertionError(f"no worker reached {point}")


def test_ray_workers_sigkilled_mid_chunk_leave_no_partial_run_and_the_job_completes(plain_registry, local_batch,
                                                                                    tmp_path, monkeypatch):
    """Real Ray actors SIGKILLed at two steps of a chunk (held there by the test hook
    :func:`distributed.pause_point`, so nothing races on timing): one after its child tables are
    committed, before its ``runs`` rows (a reader then sees none of that chunk); one after its whole
    chunk is committed, before its result is returned. Ray restarts each actor and retries its chunk:
    the first chunk's committed child tables are skipped by their marker, the second chunk is skipped
    whole. The job completes with one copy of every run, and no version of ``runs`` shows part of one."""
    ray = pytest.importorskip("ray")
    uri = tmp_path / "store"
    job, config = _job(plain_registry, uri, chunk_size=2)  # three chunks over two actors
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    for point in ("children-committed", "committed"):
        (pauses / point).touch()
    monkeypatch.setenv(distributed.PAUSE_ENV, str(pauses))  # before ray.init: its workers inherit it
    chunk_keys = {chunk.index: {key for key, _ in chunk.items} for chunk in job.chunks}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with ThreadPoolExecutor(1) as driver:
            running = driver.submit(distributed.run_job, job, config, 2, None, True)
            try:
                deadline = time.time() + 180
                pid, mid = _claimed(pauses, "children-committed", running, deadline)
                written = store.open_table(str(uri), "activations").to_pyarrow_table(columns=["run_key"])
                assert chunk_keys[mid] <= set(written["run_key"].to_pylist())  # its child rows are in the store
                snapshot = store.StoreCatalog(str(uri))
                try:  # ... and not seen
                    visible = {r[0] for r in _rows(snapshot, "SELECT run_key FROM runs")}
                    assert not visible & chunk_keys[mid]
                    for table in ("tokens", "activations", "run_saes"):
                        assert {r[0] for r in _rows(snapshot, f"SELECT DISTINCT run_key FROM {table}")} <= visible
                finally:
                    snapshot.close()
                os.kill(pid, signal.SIGKILL)
                pid, done = _claimed(pauses, "committed", running, deadline)
                assert store.chunk_done(str(uri), job.chunks[done].marker)
                os.kill(pid, signal.SIGKILL)
                results = running.result(timeout=max(deadline - time.time(), 1))
            finally:
                for claimed in pauses.iterdir():  # a failed assertion must not leave a worker waiting
                    claimed.unlink()
    finally:
        ray.shutdown()
    assert sorted(r["chunk"] for r in results) == [0, 1, 2]
    assert [r["skipped"] for r in results if r["chunk"] == done] == [True]  # retried: its marker was checked
    assert sum(r["runs"] for r in results) == 6 - len(chunk_keys[done])  # every other run computed once
    local, shared = Catalog(local_batch, read_only=True), store.StoreCatalog(str(uri))
    try:
        _same_acts(shared, local)
        assert _rows(shared, "SELECT count(*), count(DISTINCT run_id) FROM runs") == [(6, 6)]
        _whole_runs_at_every_version(uri, local)
    finally:
        local.close()
        shared.close()


@pytest.fixture(scope="module")
def calibrated(plain_registry, toy_demo, local_batch, tmp_path_factory):
    """The prompts in a store (one chunk), then the toy SAEs calibrated on the same corpus into that store
    and into a copy of the local batch catalog: the pair the calibrated comparisons read."""
    tmp = tmp_path_factory.mktemp("store-calibrated")
    uri = tmp / "store"
    job, config = _job(plain_registry, uri, chunk_size=6)
    distributed.run_job(job, config)
    local_db = tmp / "local.duckdb"
    shutil.copy(local_batch, local_db)
    for target in (["--db", str(local_db)], ["--store", str(uri)]):
        done = run_cli("calibrate", "--model", "toy", "--sae", "toy", "--corpus", str(toy_demo / "calibration.jsonl"),
                       "--registry", str(plain_registry), "--device", "cpu", *target)
        assert done.returncode == 0, done.stderr
    return uri, local_db


def test_calibrate_into_the_store_ranks_as_the_local_catalog_does(calibrated):
    uri, local_db = calibrated
    local, shared = Catalog(local_db, read_only=True), store.StoreCatalog(str(uri))
    try:
        stats = "SELECT layer, stream, feature_id, p95, density FROM v_feature_stats ORDER BY ALL"
        assert _rows(shared, stats) == _rows(local, stats) and len(_rows(local, stats)) > 100
        labels = "SELECT s.layer, s.stream, l.feature_id, l.label FROM labels l JOIN saes s USING (sae_key) ORDER BY ALL"
        assert _rows(shared, labels) == _rows(local, labels)
        for run_id in [r[0] for r in _rows(local, "SELECT run_id FROM runs ORDER BY run_id")][:3]:
            assert rerank(shared, run_id, {})["threshold_source"] == "calibration_p95"
            assert _ranked(shared, run_id) == _ranked(local, run_id)
    finally:
        local.close()
        shared.close()


def _with_keys(rows, **keys) -> object:
    """``rows`` (Arrow) with key columns replaced: a constant, or a mapping old key → new key."""
    for name, value in keys.items():
        old = rows.column(name).to_pylist()
        new = [value.get(k, k) for k in old] if isinstance(value, dict) else [value] * len(old)
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(new, rows.schema.field(name).type))
    return rows


def test_a_model_sae_or_run_stored_twice_by_concurrent_jobs_is_read_once(calibrated, tmp_path):
    """What two concurrent drivers can leave (README, Store): the same model and SAEs registered under
    second keys, a run stored by both jobs, and a run whose keys are the second ones. The snapshot shows
    each model, SAE and run once, the run's rows once, and the run on the second keys ranks with the
    calibration made under the first (planted here with the store's own append)."""
    uri, _ = calibrated
    twice = tmp_path / "store"
    shutil.copytree(uri, twice)
    before = store.StoreCatalog(str(twice))
    con = before.raw()
    try:
        run_ids = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_key").fetchall()]
        dup_id, twin_id = run_ids[0], run_ids[1]
        expected = {sql: con.execute(sql).fetchall() for sql in (
            "SELECT count(*), count(DISTINCT run_id) FROM v_runs", "SELECT count(*) FROM models",
            "SELECT count(*) FROM saes", ACTS_SQL, "SELECT run_id, count(*) FROM v_tokens GROUP BY ALL ORDER BY ALL")}
        ranked = _ranked(before, twin_id)
        top = {t: con.execute(f"SELECT max({k}) FROM _store_{t}").fetchone()[0] + 100
               for t, k in (("models", "model_key"), ("saes", "sae_key"), ("runs", "run_key"))}
        sae_map = {k: k + top["saes"] for (k,) in con.execute("SELECT sae_key FROM _store_saes").fetchall()}
        store.append(str(twice), "models", _with_keys(con.execute("SELECT * FROM _store_models").to_arrow_table(),
                                                        model_key={k: k + top["models"] for k in range(top["models"])}))
        store.append(str(twice), "saes", _with_keys(con.execute("SELECT * FROM _store_saes").to_arrow_table(), sae_key=sae_map))
        for n, (source_id, new_id) in enumerate(((dup_id, dup_id), (twin_id, "f" * 24))):
            (old_key,) = con.execute("SELECT run_key FROM _store_runs WHERE run_id = ?", [source_id]).fetchone()
            new_key = top["runs"] + n
            for child in ("run_saes", "tokens", "activations", "run_batch_ids", "run_calibrations"):
                rows = con.execute(f"SELECT * FROM _store_{child} WHERE run_key = ?", [old_key]).to_arrow_table()
                keys = {"run_key": new_key, **({"sae_key": sae_map} if "sae_key" in rows.column_names else {})}
                store.append(str(twice), child, _with_keys(rows, **keys))
            run = con.execute("SELECT * FROM _store_runs WHERE run_key = ?", [old_key]).to_arrow_table()
            run = _with_keys(run, run_key=new_key, model_key={k: k + top["models"] for k in range(top["models"])})
            store.append(str(twice), "runs", run.set_column(run.schema.get_field_index("run_id"), "run_id",
                                                            pa.array([new_id])))
    finally:
        con.close()
        before.close()
    after = store.StoreCatalog(str(twice))
    try:
        con = after.raw()
        try:
            counts = con.execute("SELECT count(*), count(DISTINCT run_id) FROM v_runs").fetchall()
            assert counts == [(expected["SELECT count(*), count(DISTINCT run_id) FROM v_runs"][0][0] + 1,) * 2]
            for sql in ("SELECT count(*) FROM models", "SELECT count(*) FROM saes"):
                assert con.execute(sql).fetchall() == expected[sql]
            twin_rows = [r[1:] for r in con.execute(ACTS_SQL).fetchall() if r[0] == "f" * 24]
            assert twin_rows == [r[1:] for r in expected[ACTS_SQL] if r[0] == twin_id]
            assert [r for r in con.execute(ACTS_SQL).fetchall() if r[0] != "f" * 24] == expected[ACTS_SQL]
        finally:
            con.close()
        result = rerank(after, "f" * 24, {"min_coverage_pct": 0})
        assert result["threshold_source"] == "calibration_p95" and not any("calibrat" in w for w in result["warnings"])
        assert _ranked(after, "f" * 24) == ranked and _ranked(after, dup_id) == _ranked(store.StoreCatalog(str(uri)),
                                                                                         dup_id)
    finally:
        after.close()


def test_calibrate_store_with_ray_tasks_gives_the_local_statistics_and_resumes(calibrated, plain_registry, toy_demo,
                                                                               tmp_path):
    """``calibrate --store --ray``: corpus chunks as Ray tasks, the statistics in SQL over the store; equal
    to the local calibration's (to rounding: chunks micro-batch the corpus differently). The same
    command again finds every chunk and the statistics committed: nothing is added."""
    uri = tmp_path / "store"
    args = ["calibrate", "--model", "toy", "--sae", "toy", "--corpus", str(toy_demo / "calibration.jsonl"),
            "--registry", str(plain_registry), "--device", "cpu", "--store", str(uri), "--chunk_size", "15"]
    done = run_cli(*args, "--ray", "--workers", "2")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["chunks"] == 3 and info["n_docs"] == 40
    local, shared = Catalog(calibrated[1], read_only=True), store.StoreCatalog(str(uri))
    try:
        stats = "SELECT layer, stream, feature_id, p95, p95_all, mean, max, density, n_tokens FROM v_feature_stats ORDER BY ALL"
        expected = _rows(local, stats)
        got = _rows(shared, stats)
        assert [r[:3] for r in got] == [r[:3] for r in expected] and len(expected) > 100
        assert np.allclose([r[3:] for r in got], [r[3:] for r in expected], rtol=1e-5, atol=1e-6)
        tokens = "SELECT doc, position, token_id, token FROM calibration_tokens ORDER BY ALL"
        assert _rows(shared, tokens) == _rows(local, tokens)  # documents numbered in the whole corpus
        n_labels = _rows(local, "SELECT count(*) FROM labels WHERE source = 'lite'")
        assert _rows(shared, "SELECT count(*) FROM labels WHERE source = 'lite'") == n_labels
    finally:
        local.close()
        shared.close()
    again = run_cli(*args)  # the same job without Ray: every chunk committed, the statistics too
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["calibration_id"] == info["calibration_id"]
    snapshot = store.StoreCatalog(str(uri))
    try:
        assert _rows(snapshot, "SELECT count(*) FROM calibrations") == [(1,)]
        assert _rows(snapshot, "SELECT count(*) FROM feature_stats") == [(len(expected),)]
    finally:
        snapshot.close()
    refused = run_cli("calibrate", "--model", "toy", "--sae", "toy", "--registry", str(plain_registry), "--ray")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ray: only with --store")


def _close(a, b) -> bool:
    """Equal JSON values, floats to rounding (the store's runs were micro-batched differently)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-6)
    return a == b


def _busiest(local: Catalog) -> int:
    return _rows(local, "SELECT feature_id FROM v_activations WHERE layer = 1 GROUP BY feature_id "
                        "ORDER BY count(DISTINCT run_id) DESC, sum(act) DESC, feature_id LIMIT 1")[0][0]


def test_feature_show_and_the_server_over_a_store_answer_as_the_local_catalog(calibrated, plain_registry, tmp_path):
    """``feature show --store`` and ``serve --store`` (a pinned snapshot: runs, rank, feature, SQL read;
    a request that would write is a 409 naming store) give the local catalog's answers."""
    from tests.test_api import Server, assert_error

    uri, local_db = calibrated
    local = Catalog(local_db, read_only=True)
    try:
        fid = _busiest(local)
        run_ids = [r[0] for r in _rows(local, "SELECT run_id FROM v_runs ORDER BY run_id")]
        texts = dict(_rows(local, "SELECT run_id, text FROM runs WHERE mode = 'text'"))
        count = _rows(local, "SELECT count(*), sum(act) FROM v_activations")[0]
        ranked = {rid: rerank(local, rid, {"score_mode": "max", "min_coverage_pct": 0}) for rid in run_ids[:2]}
    finally:
        local.close()
    feature = ["feature", "show", "--sae", "toy", "--layer", "1", "--feature", str(fid), "--format", "json",
               "--registry", str(plain_registry)]
    views = [run_cli(*feature, *target) for target in (["--store", str(uri)], ["--db", str(local_db), "--read_only"])]
    assert all(v.returncode == 0 for v in views), [v.stderr for v in views]
    from_store, from_local = (json.loads(v.stdout) for v in views)
    assert from_store["n_runs"] >= 2 and from_store["calibration"] is not None and from_store["labels"]
    for view in (from_store, from_local):  # the calibration's id is the store's or the file's own
        view["calibration"].pop("calibration_id")
    assert _close(from_store, from_local)

    srv = Server(tmp_path / "unused.duckdb", plain_registry, tmp_path / "server.log", "--store", str(uri),
                 "--enable_sql")
    try:
        c = srv.client
        health = c.get("/healthz").json()
        assert health["read_only"] and health["store"] == {"name": uri.name, "runs_version":
                                                           store.open_table(str(uri), "runs").version()}
        page = c.get("/v1/runs", params={"limit": 100}).json()
        assert sorted(r["run_id"] for r in page["runs"]) == run_ids and page["total"] == 6
        assert c.get(f"/v1/runs/{run_ids[0][:8]}").json()["run_id"] == run_ids[0]
        for rid, expected in ranked.items():
            got = c.post(f"/v1/runs/{rid}/rank", json={"score_mode": "max", "min_coverage_pct": 0})
            assert got.status_code == 200, got.text
            assert _close([f["feature_id"] for f in got.json()["features"]], [f["feature_id"] for f in expected["features"]])
            assert _close([f["score"] for f in got.json()["features"]], [f["score"] for f in expected["features"]])
        got = c.get(f"/v1/features/toy/1/resid_pre/{fid}")
        assert got.status_code == 200, got.text
        got = got.json()
        got["calibration"].pop("calibration_id")
        assert got["calibration"]["corpus"] == Path(from_local["calibration"]["corpus"]).name  # the server's path kept
        assert _close(got, {**from_local, "calibration": {**from_local["calibration"], "corpus": got["calibration"]["corpus"]}})
        sql = c.post("/v1/sql", json={"query": "SELECT count(*), sum(act) FROM v_activations"})
        assert sql.status_code == 200, sql.text
        assert _close(sql.json()["rows"], [list(count)])
        stored_text = next(iter(texts.items()))
        body = {"model_id": "toy", "sae_id": "toy", "text": stored_text[1], "layers": [0, 1]}
        cached = c.post("/v1/sae/features/discover", json=body)
        assert cached.status_code == 200 and cached.json()["cached"] and cached.json()["run_id"] == stored_text[0]
        for path, payload in (("/v1/sae/features/discover", {**body, "text": "Never stored."}),
                              ("/v1/labels/import", {"sae_id": "toy", "format": "csv", "content": "feature_id,label\n1,x\n",
                                                     "layer": 1, "stream": "resid_pre"})):
            refused = assert_error(c.post(path, json=payload), 409, "store")
            assert "pinned snapshot" in refused["detail"]
        assert c.get("/healthz").json()["forward_runs"] == 0
    finally:
        srv.stop()
    assert "unhandled error" not in srv.log.read_text()


DRIFT_TEXTS = ["Shares of ACME rose 4% after the company beat earnings estimates and raised its dividend.",
               "The central bank held interest rates steady; bond yields fell and the dollar weakened.",
               "Quarterly revenue grew while operating margin narrowed, and the stock slipped in late trading."]


def test_drift_over_a_store_equals_the_local_catalog(toy_demo, tmp_path):
    """The two-model fixture (toy and its finance tune): the same prompts of both models ingested into a
    store and run in local batch mode; drift over ``--store`` gives the local catalog's figures."""
    reg = tmp_path / "reg.toml"
    reg.write_text(f'[models.toy]\npath = "{toy_demo / "model"}"\n[models.toy-finance]\npath = "{toy_demo / "model-finance"}"'
                   f'\n[saes.toy]\npath = "{toy_demo / "saes"}"\n')
    prompts = tmp_path / "both.jsonl"
    prompts.write_text("".join(json.dumps({"text": t, "model_id": m, "id": f"{m}-{n}"}) + "\n"
                               for m in ("toy", "toy-finance") for n, t in enumerate(DRIFT_TEXTS)))
    common = ["--prompts_file", str(prompts), "--registry", str(reg), *CLI_OPTIONS]
    uri, db = tmp_path / "store", tmp_path / "local.duckdb"
    for args in (["ingest", "--store", str(uri), "--chunk_size", "2"], ["--db", str(db), "--out", str(tmp_path / "b.jsonl")]):
        done = run_cli(*args, *common)
        assert done.returncode == 0, done.stderr
    opts = {"layers": [0, 1], "top_k": 12, "min_coverage_pct": 0.5, "min_relative_change": 0.3, "min_rank_shift": 3}
    sides = {"base_runs": "model_id = 'toy'", "tuned_runs": "model_id = 'toy-finance'"}
    local, shared = Catalog(db, read_only=True), store.StoreCatalog(str(uri))
    try:
        reports = [drift_report(cat, **sides, **opts, allow_sql_filter=True) for cat in (local, shared)]
        base_ids = [r[0] for r in _rows(local, "SELECT run_id FROM runs WHERE model_id = 'toy' ORDER BY run_id")]
    finally:
        local.close()
        shared.close()
    assert reports[0]["overall"]["spearman"] < 1.0 and reports[0]["features"]  # the tune moved something
    for part in ("base", "tuned", "hooks", "threshold_source", "overall", "prompts", "features", "flagged", "unpaired"):
        assert _close(reports[1][part], reports[0][part]), part
    out = tmp_path / "drift.json"
    done = run_cli("drift", "--store", str(uri), "--base_runs", *base_ids, "--tuned_runs", "model_id", "=",
                   "'toy-finance'", *[x for k, v in opts.items() for x in (f"--{k}", *map(str, v if isinstance(v, list)
                                                                                         else [v]))], "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert _close(json.loads(out.read_text())["overall"], reports[0]["overall"])


def _held(snapshot: store.StoreCatalog, visible: dict, expected: dict) -> str:
    """What a snapshot held, for a failure's message: which run differs, and the keys behind it."""
    return (f"visible {visible}, expected {expected}, versions {snapshot.versions}, runs "
            f"{_rows(snapshot, 'SELECT run_key, run_id, model_key FROM runs ORDER BY ALL')}, saes "
            f"{_rows(snapshot, 'SELECT sae_key, layer FROM saes ORDER BY ALL')}, stored activations per key "
            f"{_rows(snapshot, 'SELECT run_key, sae_key, count(*) FROM _store_activations GROUP BY ALL ORDER BY ALL')}")


def test_a_reader_sees_only_committed_whole_runs_while_two_jobs_write(plain_registry, local_batch, tmp_path):
    """Two drivers (separate processes, separate jobs, racing for keys and tables) write one store while
    this process reads it: every snapshot holds only whole runs, and runs never disappear."""
    halves = [[line for line in LINES if line["id"] in ids] for ids in (("a", "b", "c"), ("d", "e", "f"))]
    procs = []
    for n, half in enumerate(halves):
        prompts = tmp_path / f"half{n}.jsonl"
        prompts.write_text("".join(json.dumps(line) + "\n" for line in half))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sae_discover", "ingest", "--prompts_file", str(prompts), "--store", str(tmp_path / "s"),
             "--registry", str(plain_registry), "--chunk_size", "1", *CLI_OPTIONS],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    local = Catalog(local_batch, read_only=True)
    per_run = "SELECT run_id, count(*) FROM v_activations GROUP BY run_id"
    expected = dict(_rows(local, per_run))
    tokens = "SELECT r.run_id, r.n_tokens, count(t.position) FROM runs r LEFT JOIN tokens t USING (run_key) GROUP BY ALL"
    seen, snapshots = 0, 0
    try:
        while any(p.poll() is None for p in procs):
            if not (tmp_path / "s" / "_key_ranges" / "_delta_log").is_dir():
                time.sleep(0.05)
                continue
            snapshot = store.StoreCatalog(str(tmp_path / "s"))
            try:
                visible = dict(_rows(snapshot, per_run))
                assert all(expected[rid] == n for rid, n in visible.items()), _held(snapshot, visible, expected)
                assert all(n_tokens == n for _, n_tokens, n in _rows(snapshot, tokens)), _held(snapshot, visible, expected)
                assert len(visible) >= seen  # a committed run stays visible
                seen, snapshots = len(visible), snapshots + 1
            finally:
                snapshot.close()
        for p in procs:
            assert p.wait() == 0, p.stderr.read()
        final = store.StoreCatalog(str(tmp_path / "s"))
        try:
            assert dict(_rows(final, per_run)) == expected
            assert _rows(final, "SELECT count(*), count(DISTINCT run_key) FROM runs") == [(6, 6)]  # keys never shared
        finally:
            final.close()
    finally:
        local.close()
    assert snapshots > 3  # the reader really read while the writers wrote


def test_context_over_a_store_equals_the_local_catalog_on_the_demo(tmp_path):
    """Context reads the calibration's documents through the store's views: the demo's layer-2 SAE (its
    features co-fire by topic, unlike the toy's) calibrated on 40 of the demo's documents into a store
    and into a local catalog, two prompts ingested into each: the same context rankings, with nonzero
    supports."""
    demo = ROOT / "ingest" / "demo"
    registry = tmp_path / "demo.toml"  # no calibration corpus: nothing calibrates on first use
    registry.write_text(f'[models.demo]\npath = "{demo / "model"}"\n[saes.demo]\npath = "{demo / "saes"}"\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join((demo / "calibration.jsonl").read_text().splitlines(keepends=True)[:40]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "Revenue grew 12% and operating margin expanded as free cash flow improved.",
        "Whisk the eggs with sugar, then bake the cake for 30 minutes.")))
    hooks = ["--model", "demo", "--sae", "demo", "--layers", "2", "--streams", "resid_pre", "--device", "cpu",
             "--registry", str(registry)]
    uri, db = tmp_path / "store", tmp_path / "local.duckdb"
    for target in (["--db", str(db)], ["--store", str(uri)]):
        done = run_cli("calibrate", "--corpus", str(corpus), *hooks, *target)
        assert done.returncode == 0, done.stderr
    for done in (run_cli("--prompts_file", str(prompts), "--db", str(db), *hooks, "--out", str(tmp_path / "x.jsonl")),
                 run_cli("ingest", "--prompts_file", str(prompts), "--store", str(uri), *hooks)):
        assert done.returncode == 0, done.stderr
    local, shared = Catalog(db, read_only=True), store.StoreCatalog(str(uri))
    try:
        run_ids = [r[0] for r in _rows(local, "SELECT run_id FROM runs ORDER BY run_id")]
        assert len(run_ids) == 2
        for run_id in run_ids:
            in_store, in_file = ([(f["feature_id"], f["score"]) for f in rerank(
                cat, run_id, {"score_mode": "context", "min_coverage_pct": 0, "return_top_x": 50})["features"]]
                for cat in (shared, local))
            assert in_store == [(f, pytest.approx(score, rel=1e-5)) for f, score in in_file]
            assert sum(score > 0 for _, score in in_file) >= 20
    finally:
        local.close()
        shared.close()


@pytest.mark.parametrize("max_files", [store.PARQUET_MAX_FILES, 0])  # bound by read_parquet / as an Arrow dataset
def test_a_store_written_before_lite_labels_had_a_calibration_reads_and_takes_them(tmp_path, monkeypatch, max_files):
    """A store whose ``labels`` table predates ``calibration_id`` (revision 0009): its rows read with the
    column NULL, and the next append adds the column (Delta schema merge) with the new rows' values."""
    monkeypatch.setattr(store, "PARQUET_MAX_FILES", max_files)
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    uri = str(tmp_path / "store")
    os.makedirs(uri)
    old = pa.schema([f for f in store.arrow_schema("labels") if f.name != "calibration_id"])
    DeltaTable.create(store.table_uri(uri, "labels"), schema=old)  # as a store made before 0009 has it: empty
    store.create_tables(uri)  # the other tables; labels stays as it was
    snapshot = store.StoreCatalog(uri)
    try:  # the catalog's columns, each once
        assert [r[0] for r in _rows(snapshot, "DESCRIBE labels")] == store.arrow_schema("labels").names
    finally:
        snapshot.close()
    row = {"sae_key": [1], "feature_id": [3], "label": ["fires on \"x\""], "source": ["lite"], "score": [None]}
    write_deltalake(store.table_uri(uri, "labels"), pa.table({**row, "created_at": [None]}, schema=old), mode="append")
    assert "calibration_id" not in store.open_table(uri, "labels").schema().to_arrow().names
    query = "SELECT feature_id, label, calibration_id FROM labels ORDER BY feature_id"
    snapshot = store.StoreCatalog(uri)
    try:
        assert _rows(snapshot, query) == [(3, "fires on \"x\"", None)]
    finally:
        snapshot.close()
    store.append(uri, "labels", pa.table({**row, "feature_id": [4], "label": ["fires on \"y\""], "calibration_id": [7]}))
    snapshot = store.StoreCatalog(uri)
    try:
        assert _rows(snapshot, query) == [(3, "fires on \"x\"", None), (4, "fires on \"y\"", 7)]
        assert [r[0] for r in _rows(snapshot, "DESCRIBE labels")] == store.arrow_schema("labels").names
    finally:
        snapshot.close()


def test_a_killed_worker_process_is_one_line_and_the_rerun_completes(plain_registry, tmp_path):
    """SIGKILL of a --workers process (the kernel's out-of-memory killer, or a user): exit 1 with one line
    saying what happened and how to resume (no BrokenProcessPool traceback); the same command completes."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"Revenue rose {i} percent at company {i}."}) + "\n"
                               for i in range(120)))
    cmd = [sys.executable, "-m", "sae_discover", "ingest", "--prompts_file", str(prompts), "--store",
           str(tmp_path / "s"), "--registry", str(plain_registry), "--workers", "2", "--chunk_size", "2",
           "--threads", "1", *CLI_OPTIONS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def workers() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().split()
                line = Path(f"/proc/{pid}/cmdline").read_text()
            except OSError:
                continue
            if stat[3] == str(proc.pid) and "spawn_main" in line:
                found.append(int(pid))
        return found

    deadline = time.monotonic() + 120
    while len(workers()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # the workers are loading or computing
    os.kill(workers()[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: workers: a worker process died") and "Traceback" not in err, err[-2000:]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    snapshot = store.StoreCatalog(str(tmp_path / "s"))
    try:
        assert _rows(snapshot, "SELECT count(*), count(DISTINCT run_id) FROM runs") == [(120, 120)]
    finally:
        snapshot.close()


@pytest.mark.parametrize("command", ["ingest", "calibrate"])
def test_a_ray_address_where_nothing_listens_is_refused_in_seconds(plain_registry, toy_demo, tmp_path, command):
    """Ray itself retries an unreachable cluster for minutes; a --ray HOST:PORT where nothing listens is a
    one-line error naming ray within seconds, before the store is written."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "Revenue rose."}) + "\n")
    what = ["--prompts_file", str(prompts), *CLI_OPTIONS] if command == "ingest" else \
        ["--model", "toy", "--sae", "toy", "--corpus", str(toy_demo / "calibration.jsonl"), "--device", "cpu"]
    started = time.monotonic()
    proc = run_cli(command, *what, "--store", str(tmp_path / "s"), "--registry", str(plain_registry),
                   "--ray", f"127.0.0.1:{port}")
    assert time.monotonic() - started < 60
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: ray: no Ray cluster answers at 127.0.0.1:{port}"), \
        proc.stderr
    assert not (tmp_path / "s").exists()


def test_store_import_refusals_leave_no_local_file(calibrated, tmp_path):
    uri, _ = calibrated
    for store_arg, extra, field in ((str(tmp_path / "missing"), [], "store"),
                                    (str(uri), ["--where", "nonsense_col = 1"], "where")):
        db = tmp_path / f"{field}.duckdb"
        proc = run_cli("store", "import", store_arg, "--db", str(db), *extra)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {field}: "), proc.stderr
        assert not db.exists()
    db = tmp_path / "ok.duckdb"
    done = run_cli("store", "import", str(uri), "--db", str(db), "--where", "mode = 'text'")
    assert done.returncode == 0 and json.loads(done.stdout)["runs"] >= 1, done.stderr


def test_a_store_that_knows_a_model_by_its_old_fingerprint_keeps_its_key(plain_registry, toy_demo, tmp_path):
    """Earlier versions hashed the model folder's path into its fingerprint: a store whose ``models`` row
    holds that one (as such a version wrote it) gives new runs the same model key — its calibrations and
    the batch background's "same model" carry over — and gains no second row for the model."""
    card = read_card(str(toy_demo / "model"))
    assert card.legacy_fingerprint and card.legacy_fingerprint != card.fingerprint
    uri = str(tmp_path / "store")
    store.create_tables(uri)
    store.append(uri, "models", pa.Table.from_pylist([{
        "model_key": 7, "model_id": "toy", "fingerprint": card.legacy_fingerprint, "family": card.family,
        "n_layers": card.n_layers, "d_model": card.d_model, "created_at": datetime.now()}]))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "Shares rose 4% on Monday."}) + "\n")
    done = run_cli("ingest", "--prompts_file", str(prompts), "--store", uri, "--registry", str(plain_registry),
                   *CLI_OPTIONS)
    assert done.returncode == 0, done.stderr
    snapshot = store.StoreCatalog(uri)
    try:
        assert _rows(snapshot, "SELECT model_key, fingerprint FROM models") == [(7, card.legacy_fingerprint)]
        assert _rows(snapshot, "SELECT model_key FROM runs") == [(7,)]
    finally:
        snapshot.close()
