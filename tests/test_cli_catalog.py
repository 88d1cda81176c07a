"""Catalog subcommands through the real CLI: runs list/show/rank, read-only sql, calibrate, labels, the lock message."""

from __future__ import annotations

import json
import time

import duckdb
import pytest

from tests.conftest import held_catalog, read_json, run_cli


@pytest.fixture(scope="module")
def stored(toy_registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-cat")
    db = tmp / "c.duckdb"
    out = tmp / "r.json"
    proc = run_cli("--registry", str(toy_registry), "--db", str(db), "--model", "toy", "--sae", "toy", "--text",
                   "Shares of Hooli fell 9% after the company missed on churn.", "--layers", "0", "1",
                   "--min_coverage_pct", "0", "--return_top_x", "1000", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return {"db": db, "result": read_json(out), "registry": toy_registry, "tmp": tmp}


def test_runs_list_and_show(stored):
    proc = run_cli("runs", "list", "--db", str(stored["db"]))
    assert proc.returncode == 0, proc.stderr
    run_id = stored["result"]["run_id"]
    header, first = proc.stdout.splitlines()[:2]
    assert header.split()[:6] == ["run_id", "model_id", "sae_id", "mode", "layers", "streams"]
    assert first.split()[:7] == [run_id, "toy", "toy", "text", "0", "1", "resid_pre"]
    show = run_cli("runs", "show", run_id, "--db", str(stored["db"]))
    info = json.loads(show.stdout)
    assert info["run_id"] == run_id and info["n_kept"] == stored["result"]["analyzed"]["tokens"]
    assert sorted((s["layer"], s["stream"]) for s in info["saes"]) == [(0, "resid_pre"), (1, "resid_pre")]


def test_runs_rank_reranks_without_the_model(stored):
    out = stored["tmp"] / "rerank.json"
    proc = run_cli("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--score_mode", "max",
                   "--return_top_x", "3", "--min_coverage_pct", "0", "--merge_across_layers", "false", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = read_json(out)
    assert r["cached"] and r["score_mode"] == "max"
    for layer in (0, 1):
        scores = [f["score"] for f in r["features"] if f["layer"] == layer]
        assert 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
    # max mode, normalized by the calibration max: the top feature of layer 0 equals the best in the full list
    full = {(f["layer"], f["feature_id"]): f for f in stored["result"]["features"]}
    top0 = next(f for f in r["features"] if f["layer"] == 0)
    assert full[(0, top0["feature_id"])]["scores"]["max"] == pytest.approx(top0["scores"]["max"])
    bad = run_cli("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--score_mode", "median")
    assert bad.returncode == 2 and bad.stderr.startswith("error: score_mode:")
    # the τ basis: the all-token P95 (zeros included) is never above the firing-distribution P95, so every
    # feature's coverage can only grow
    cover = {}
    for basis in ("active", "all"):
        out = stored["tmp"] / f"rerank-{basis}.json"
        proc = run_cli("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--tau_basis", basis,
                       "--min_coverage_pct", "0", "--return_top_x", "1000", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        r = read_json(out)
        assert r["threshold_source"] == {"active": "calibration_p95", "all": "calibration_p95_all"}[basis]
        cover[basis] = {(f["layer"], f["feature_id"]): f["scores"]["coverage"] for f in r["features"]}
    assert cover["active"].keys() == cover["all"].keys()
    assert all(cover["all"][k] >= c for k, c in cover["active"].items())
    assert sum(cover["all"].values()) > sum(cover["active"].values())
    bad = run_cli("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--tau_basis", "zeros")
    assert bad.returncode == 2 and bad.stderr.startswith("error: tau_basis:")
    # normalization: none ranks the raw mean × coverage; sae_median_max divides every feature of a hook alike
    for norm in ("none", "sae_median_max"):
        out = stored["tmp"] / f"rerank-{norm}.json"
        proc = run_cli("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--normalization", norm,
                       "--min_coverage_pct", "0", "--return_top_x", "1000", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        r = read_json(out)
        assert r["normalization"] == norm and r["features"]
        ratios = {}
        for f in r["features"]:
            raw = f["scores"]["mean"] * f["scores"]["coverage"]
            ratios.setdefault(f["layer"], set()).add(round(raw / f["score"], 6) if f["score"] else None)
        # one divisor per hook: 1 for none, the hook's median calibration max for sae_median_max
        assert all(len(v - {None}) == 1 for v in ratios.values()), ratios
        if norm == "none":
            assert all(v - {None} == {1.0} for v in ratios.values())
    shown = run_cli("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--normalization", "none")
    assert shown.returncode == 0 and " score mean×coverage (normalization none) · τ " in shown.stdout.splitlines()[0]
    bad = run_cli("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--normalization", "zscore")
    assert bad.returncode == 2 and bad.stderr.startswith("error: normalization:")


def test_format_alone_prints_the_result_in_that_format(stored):
    """``--format`` without ``--out`` prints the result in that format (not the table), the same text the
    file would hold; html prints the report."""
    args = ("runs", "rank", stored["result"]["run_id"], "--db", str(stored["db"]), "--score_mode", "max",
            "--return_top_x", "4", "--min_coverage_pct", "0")
    out = stored["tmp"] / "fmt.json"
    assert run_cli(*args, "--out", str(out)).returncode == 0
    printed = run_cli(*args, "--format", "json")
    assert printed.returncode == 0, printed.stderr
    as_json, from_file = json.loads(printed.stdout), read_json(out)
    assert [(f["layer"], f["feature_id"], f["score"]) for f in as_json["features"]] == \
           [(f["layer"], f["feature_id"], f["score"]) for f in from_file["features"]]
    csv_out = stored["tmp"] / "fmt.csv"
    assert run_cli(*args, "--out", str(csv_out)).returncode == 0
    printed = run_cli(*args, "--format", "csv")
    assert printed.returncode == 0 and printed.stdout == csv_out.read_text()
    assert printed.stdout.splitlines()[0].startswith("feature_id,layer,stream,score")
    html = run_cli(*args, "--format", "html")
    assert html.returncode == 0 and html.stdout.lstrip().lower().startswith("<!doctype html>")


def test_sql_is_read_only(stored):
    proc = run_cli("sql", "SELECT count(*) AS n FROM v_activations", "--db", str(stored["db"]), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    n = duckdb.connect(str(stored["db"]), read_only=True).execute("SELECT count(*) FROM activations").fetchone()[0]
    assert json.loads(proc.stdout) == [{"n": n}] and n > 0
    bad = run_cli("sql", "DELETE FROM runs", "--db", str(stored["db"]))
    assert bad.returncode == 2 and "read-only" in bad.stderr
    assert duckdb.connect(str(stored["db"]), read_only=True).execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def test_sql_on_a_catalog_of_an_older_schema_says_how_to_upgrade_it(tmp_path):
    """``sql`` opens read-only and never upgrades: a query that needs the newer schema fails with the
    catalog's and this version's revisions and the way to upgrade; after that it answers."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from catalog.db import MIGRATIONS_DIR, alembic_config

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    db = tmp_path / "old.duckdb"
    command.upgrade(alembic_config(f"duckdb:///{db}"), "0011")
    query = "SELECT count(*) AS n FROM feature_scores(['x'], normalization := 'none')"
    old = run_cli("sql", query, "--db", str(db))
    assert old.returncode == 2 and old.stderr.startswith("error: query: ") and len(old.stderr.splitlines()) == 1
    assert f"this catalog has schema 0011, this version uses {head}" in old.stderr
    assert old.stderr.rstrip().endswith(f"python -m sae_discover runs list --db {db})")
    assert run_cli("runs", "list", "--db", str(db)).returncode == 0  # opened with write access: upgraded
    new = run_cli("sql", query, "--db", str(db), "--format", "json")
    assert new.returncode == 0 and json.loads(new.stdout) == [{"n": 0}], new.stderr
    wrong = run_cli("sql", "SELECT nope FROM v_runs", "--db", str(db))  # at head: no note
    assert wrong.returncode == 2 and "schema" not in wrong.stderr
    # no note for a catalog newer than this version (it cannot upgrade it) or a file that is no catalog
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE alembic_version SET version_num = '9999'")
    newer = run_cli("sql", "SELECT nope FROM v_runs", "--db", str(db))
    assert newer.returncode == 2 and "schema" not in newer.stderr
    plain = tmp_path / "plain.duckdb"
    duckdb.connect(str(plain)).close()
    other = run_cli("sql", "SELECT nope", "--db", str(plain))
    assert other.returncode == 2 and "schema" not in other.stderr


def test_a_catalog_held_by_another_process_gets_a_clear_message(stored, tmp_path):
    db = tmp_path / "held.duckdb"
    with held_catalog(db):
        proc = run_cli("--registry", str(stored["registry"]), "--db", str(db), "--model", "toy", "--sae", "toy",
                       "--text", "hello there")
        assert proc.returncode == 3
        assert "held by another process" in proc.stderr and "Traceback" not in proc.stderr
        sql = run_cli("sql", "SELECT 1", "--db", str(db))
        assert sql.returncode == 3 and "held by another process" in sql.stderr
    time.sleep(0.1)
