"""Read-only catalogs (issue 12, item 6): a catalog opened read-only (``--read_only``, ``serve --read_only``,
or a file / folder this process cannot write) answers every read — runs list/show/rank/report, cached
discovery, drift over stored runs, sql — and refuses every write in one line naming ``db`` (CLI exit 2,
API 409) before any work for it is done. The catalog file is left byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pytest

from catalog.db import Catalog, cannot_write
from catalog.errors import CatalogError, CatalogReadOnly
from tests.conftest import ROOT, read_json, run_cli
from tests.test_hostile_inputs import assert_refused

TEXT = "Shares of Hooli fell 9% after the company missed on churn."
RUN_FLAGS = ("--model", "toy", "--sae", "toy", "--text", TEXT, "--layers", "1", "--min_coverage_pct", "0",
             "--return_top_x", "1000")


def fingerprint(db: Path) -> tuple[str, bool]:
    """The catalog file's SHA-256 and whether a write-ahead log sits next to it: a read-only catalog changes neither."""
    return hashlib.sha256(db.read_bytes()).hexdigest(), Path(f"{db}.wal").exists()


@pytest.fixture(scope="module")
def stored(toy_registry, tmp_path_factory):
    """A catalog holding TEXT on the toy model and its finance tune, and the runs of a drift over one prompt."""
    tmp = tmp_path_factory.mktemp("read-only")
    db, reg = tmp / "c.duckdb", str(toy_registry)
    results = {}
    for model in ("toy", "toy-finance"):
        out = tmp / f"{model}.json"
        proc = run_cli("--registry", reg, "--db", str(db), *RUN_FLAGS, "--model", model, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        results[model] = read_json(out)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "Revenue beat estimates."}) + "\n")
    drift = run_cli("drift", "--registry", reg, "--db", str(db), "--base", "toy", "--tuned", "toy-finance", "--sae",
                    "toy", "--prompts_file", str(prompts), "--layers", "1", "--out", str(tmp / "drift.json"))
    assert drift.returncode == 0, drift.stderr
    return {"db": db, "tmp": tmp, "registry": reg, "results": results, "prompts": prompts}


def test_every_read_command_answers_from_a_read_only_catalog(stored):
    db, tmp, reg = stored["db"], stored["tmp"], stored["registry"]
    toy, tuned = stored["results"]["toy"], stored["results"]["toy-finance"]
    before = fingerprint(db)
    ro = ("--db", str(db), "--read_only")

    listed = run_cli("runs", "list", "--format", "json", *ro)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["total"] == 4  # two discoveries, the drift's two runs
    shown = run_cli("runs", "show", toy["run_id"], *ro)
    assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"] == toy["run_id"], shown.stderr
    ranked = run_cli("runs", "rank", toy["run_id"][:8], "--score_mode", "max", "--out", str(tmp / "rank.json"), *ro)
    assert ranked.returncode == 0, ranked.stderr
    assert read_json(tmp / "rank.json")["run_id"] == toy["run_id"] and read_json(tmp / "rank.json")["features"]
    report = run_cli("runs", "report", toy["run_id"], "--out", str(tmp / "r.html"), *ro)
    assert report.returncode == 0 and toy["run_id"] in (tmp / "r.html").read_text(), report.stderr

    cached = run_cli("--registry", reg, *RUN_FLAGS, "--out", str(tmp / "cached.json"), *ro)
    assert cached.returncode == 0, cached.stderr
    again = read_json(tmp / "cached.json")
    assert again["cached"] and again["run_id"] == toy["run_id"]
    assert [(f["feature_id"], f["scores"]) for f in again["features"]] == \
        [(f["feature_id"], f["scores"]) for f in toy["features"]]

    drift = run_cli("drift", "--base_runs", toy["run_id"], "--tuned_runs", tuned["run_id"], "--layers", "1",
                    "--out", str(tmp / "d.json"), *ro)
    assert drift.returncode == 0, drift.stderr
    assert read_json(tmp / "d.json")["tuned"]["run_ids"] == [tuned["run_id"]]
    prompts = run_cli("drift", "--registry", reg, "--base", "toy", "--tuned", "toy-finance", "--sae", "toy",
                      "--prompts_file", str(stored["prompts"]), "--layers", "1", "--out", str(tmp / "d2.json"), *ro)
    assert prompts.returncode == 0, prompts.stderr  # its runs are stored: no model, no write
    again, first = read_json(tmp / "d2.json"), read_json(tmp / "drift.json")
    assert again.pop("ingested") == {"cached_runs": 2, "new_runs": 0}
    assert {k: v for k, v in again.items() if k != "timings"} == \
        {k: v for k, v in first.items() if k not in ("timings", "ingested")}

    sql = run_cli("sql", "SELECT count(*) AS n FROM runs", "--db", str(db), "--format", "json")
    assert sql.returncode == 0 and json.loads(sql.stdout) == [{"n": 4}], sql.stderr
    assert fingerprint(db) == before


@pytest.mark.parametrize(("args", "words"), [
    (("--model", "toy", "--sae", "toy", "--text", "A sentence never stored.", "--layers", "1"),
     "a request whose run is not stored yet needs to write to it"),
    (("drift", "--base", "toy", "--tuned", "toy-finance", "--sae", "toy", "--prompts_file", "{new_prompts}",
      "--layers", "1"), "a request whose run is not stored yet"),
    (("calibrate", "--model", "toy", "--sae", "toy", "--corpus", "{prompts}"), "a calibration needs to write"),
    (("labels", "import", "{labels}", "--sae", "toy", "--layer", "1", "--stream", "resid_pre"),
     "importing labels needs to write"),
], ids=["discovery", "drift-prompts", "calibrate", "labels"])
def test_writes_to_a_read_only_catalog_are_one_line_naming_db(stored, args, words):
    labels = stored["tmp"] / "labels.csv"
    labels.write_text("feature_id,label\n1,revenue\n")
    new_prompts = stored["tmp"] / "new.jsonl"
    new_prompts.write_text(json.dumps({"text": "Never stored either."}) + "\n")
    args = [a.format(prompts=stored["prompts"], labels=labels, new_prompts=new_prompts) for a in args]
    before = fingerprint(stored["db"])
    proc = run_cli(*args, "--registry", stored["registry"], "--db", str(stored["db"]), "--read_only")
    if args[0] == "drift":  # drift's progress bar may precede the error line on stderr
        proc.stderr = proc.stderr.strip().splitlines()[-1]
    err = assert_refused(proc, "db", words)
    assert f"{stored['db']} is read-only (opened read-only)" in err
    assert "calibrating" not in proc.stderr  # refused before any model work
    assert fingerprint(stored["db"]) == before


def test_discovery_on_a_read_only_catalog_answers_stored_runs_and_runs_no_model(stored, toy_registry):
    from sae_discover.registry import Registry
    from sae_discover.request import build_request
    from sae_discover.service import Discovery

    before = fingerprint(stored["db"])
    cat = Catalog(stored["db"], read_only=True)
    try:
        disc = Discovery(cat, Registry.load(toy_registry), device="cpu")
        base = {"model_id": "toy", "sae_id": "toy", "layers": [1], "min_coverage_pct": 0, "return_top_x": 1000}
        known, new = disc.discover_many([build_request({**base, "text": TEXT}),
                                         build_request({**base, "text": "Not in the catalog."})])
        assert isinstance(known, dict) and known["cached"] and known["run_id"] == stored["results"]["toy"]["run_id"]
        assert isinstance(new, CatalogReadOnly) and new.field == "db"
        assert disc.model_calls == 0
        with pytest.raises(CatalogReadOnly, match="a calibration needs to write"):
            disc.calibrate("toy", "toy", stored["prompts"])
        assert disc.model_calls == 0 and not disc.loaded_models()
    finally:
        cat.close()
    assert fingerprint(stored["db"]) == before


WAL_WRITER = """
import os, sys
from catalog.db import Catalog
cat = Catalog(sys.argv[1])
con = cat.raw()
con.execute("CREATE TABLE probe (i INTEGER)")
con.execute("CHECKPOINT")
con.execute("INSERT INTO probe SELECT range FROM range(300)")  # committed, only in the WAL
os._exit(0)
"""


def test_a_read_only_open_reads_the_write_ahead_log_and_leaves_it(tmp_path):
    db = tmp_path / "c.duckdb"
    subprocess.run([sys.executable, "-c", WAL_WRITER, str(db)], check=True, cwd=ROOT, timeout=120)
    wal = Path(f"{db}.wal")
    files = db.read_bytes(), wal.read_bytes()
    cat = Catalog(db, read_only=True)
    try:
        assert cat.raw().execute("SELECT count(*) FROM probe").fetchone() == (300,)
    finally:
        cat.close()
    assert (db.read_bytes(), wal.read_bytes()) == files  # nothing replayed into the file, the WAL kept
    cat = Catalog(db)  # a writable open still replays it
    try:
        assert cat.raw().execute("SELECT count(*) FROM probe").fetchone() == (300,)
    finally:
        cat.close()


def test_a_read_only_catalog_behind_this_schema_is_one_line(tmp_path):
    db = tmp_path / "old.duckdb"
    Catalog(db).close()
    con = duckdb.connect(str(db))
    (head,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
    con.execute("UPDATE alembic_version SET version_num = '0001'")
    con.close()
    with pytest.raises(CatalogError) as info:
        Catalog(db, read_only=True)
    assert info.value.field == "db" and f"has catalog schema 0001, this version uses {head}" in info.value.message
    assert_refused(run_cli("runs", "list", "--db", str(db), "--read_only"), "db", "open it once with write access")


def test_a_read_only_server_answers_reads_and_refuses_writes_with_409(stored, tmp_path):
    from tests.test_api import Server

    db = tmp_path / "served.duckdb"
    shutil.copy(stored["db"], db)
    before = fingerprint(db)
    toy, tuned = stored["results"]["toy"], stored["results"]["toy-finance"]
    srv = Server(db, Path(stored["registry"]), tmp_path / "server.log", "--read_only")
    try:
        c = srv.client
        health = c.get("/healthz").json()
        assert health["read_only"] is True and health["status"] == "ok"
        assert c.get("/v1/runs").json()["total"] == 4
        assert c.get(f"/v1/runs/{toy['run_id']}").json()["run_id"] == toy["run_id"]
        ranked = c.post(f"/v1/runs/{toy['run_id']}/rank", json={"score_mode": "max"})
        assert ranked.status_code == 200 and ranked.json()["features"], ranked.text
        body = {"model_id": "toy", "sae_id": "toy", "text": TEXT, "layers": [1], "min_coverage_pct": 0}
        cached = c.post("/v1/sae/features/discover", json=body)
        assert cached.status_code == 200 and cached.json()["cached"], cached.text
        assert cached.json()["run_id"] == toy["run_id"]
        drift = c.post("/v1/drift", json={"base_runs": [toy["run_id"]], "tuned_runs": [tuned["run_id"]], "layers": [1]})
        assert drift.status_code == 200 and drift.json()["tuned"]["run_ids"] == [tuned["run_id"]], drift.text
        for path, payload, words in (
            ("/v1/sae/features/discover", {**body, "text": "Never stored."}, "a request whose run is not stored yet"),
            ("/v1/drift", {"base": "toy", "tuned": "toy-finance", "sae_id": "toy", "layers": [1],
                           "prompts": [{"text": "Never stored."}]}, "a request whose run is not stored yet"),
            ("/v1/labels/import", {"sae_id": "toy", "format": "csv", "content": "feature_id,label\n1,x\n", "layer": 1,
                                   "stream": "resid_pre"}, "importing labels needs to write"),
        ):
            r = c.post(path, json=payload)
            assert r.status_code == 409, (path, r.status_code, r.text)
            assert r.json()["field"] == "db" and words in r.json()["detail"], r.text
            assert r.json()["detail"].startswith("db: the catalog is read-only") and str(tmp_path) not in r.text
        assert c.get("/healthz").json()["forward_runs"] == 0
        spec = c.get("/schema/openapi.json").json()
        assert "409" in spec["paths"]["/v1/sae/features/discover"]["post"]["responses"]
    finally:
        srv.stop()
    assert "unhandled error" not in srv.log.read_text()
    assert fingerprint(db) == before


# -- the file or its folder without write permission (needs a user that permissions apply to) -----

def as_unprivileged() -> list[str]:
    """The command prefix that runs a process as a user without root's bypass of permission bits:
    none when this process is not root, ``setpriv`` to nobody when it is; skips when neither works."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    probe = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if setpriv else []
    if not probe or subprocess.run([*probe, sys.executable, "-c", "import catalog.db"], cwd=ROOT,
                                   capture_output=True, timeout=120).returncode != 0:
        pytest.skip("running as root (permission bits do not apply) and cannot run the CLI as another user "
                    "(setpriv to nobody); the read-only opens are tested with --read_only above")
    return probe


@pytest.mark.parametrize(("file_mode", "dir_mode", "reason"), [
    (0o644, 0o777, "the file is not writable"),
    (0o666, 0o755, "its folder is not writable"),
], ids=["file", "folder"])
def test_a_catalog_this_user_cannot_write_opens_read_only_by_itself(stored, file_mode, dir_mode, reason):
    prefix = as_unprivileged()
    folder = Path(tempfile.mkdtemp(prefix="sae-discover-ro-"))
    try:
        db = folder / "c.duckdb"
        shutil.copy(stored["db"], db)
        db.chmod(file_mode)
        folder.chmod(dir_mode)
        if not prefix and os.access(db, os.W_OK) and os.access(folder, os.W_OK):
            pytest.skip("this user owns the files; the chmod did not take write access away")
        before = fingerprint(db)
        env = {**os.environ, "HOME": str(folder)}

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*prefix, sys.executable, "-m", "sae_discover", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=600)

        toy = stored["results"]["toy"]
        listed = cli("runs", "list", "--format", "json", "--db", str(db))
        assert listed.returncode == 0 and json.loads(listed.stdout)["total"] == 4, listed.stderr
        ranked = cli("runs", "rank", toy["run_id"], "--score_mode", "max", "--format", "json", "--db", str(db))
        assert ranked.returncode == 0 and toy["run_id"] in ranked.stdout, ranked.stderr
        sql = cli("sql", "SELECT count(*) AS n FROM runs", "--db", str(db), "--format", "json")
        assert sql.returncode == 0 and json.loads(sql.stdout) == [{"n": 4}], sql.stderr
        labels = folder / "labels.csv"
        shutil.copy(stored["prompts"], labels)  # any readable file: the refusal comes before it is read
        refused = cli("labels", "import", str(labels), "--sae", "demo", "--layer", "1", "--stream", "resid_pre",
                      "--db", str(db))
        assert_refused(refused, "db", f"{db} is read-only ({reason}): importing labels")
        assert fingerprint(db) == before
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


def test_cannot_write_names_what_is_not_writable(tmp_path):
    db = tmp_path / "c.duckdb"
    assert cannot_write(str(db)) is None  # not there yet: it will be made
    Catalog(db).close()
    assert cannot_write(str(db)) is None
    assert cannot_write(":memory:") is None
