"""The catalog as a query service (issue 16): tags and batch ids on runs, pinned and visible calibrations.

Real DuckDB files, the toy demo model, the real CLI in a subprocess; expected values come from
independent reads of the stored rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest

from catalog.errors import CatalogError
from sae_discover.errors import RequestError
from sae_discover.request import build_request, parse_tags
from sae_discover.stored import rerank
from tests.conftest import ROOT, run_cli

FINANCE = ["Shares of Globex rose 12% after the earnings call.", "The bank raised its interest rate forecast.",
           "Quarterly revenue beat analyst estimates by a wide margin."]
SPORTS = ["Goal!", "Team won."]  # short: the toy SAE has 64 features, and long texts fire nearly all of them


def _readme_query(name: str) -> str:
    """A SQL block of the README, found by the comment line that names it."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"```sql\n-- {re.escape(name)}\n(.*?)```", text, re.S)
    assert match, f"README has no sql block '-- {name}'"
    return match.group(1)


def test_tags_are_checked_and_not_part_of_the_run_id():
    assert parse_tags(["domain=finance,split=test", "n=3"]) == {"domain": "finance", "split": "test", "n": "3"}
    assert parse_tags({"domain": "finance", "n": 3, "ok": True, "x": 2.5}) == \
        {"domain": "finance", "n": "3", "ok": "true", "x": "2.5"}
    for bad in ({"a": {"nested": 1}}, {"a": [1]}, {"": "x"}, {"k" * 101: "x"}, {f"k{i}": i for i in range(65)},
                ["novalue"], {"a": float("nan")}, {"a:b": "c"}, {"a=b": "c"}):  # filters split at ':' / '='
        with pytest.raises(RequestError) as err:
            parse_tags(bad)
        assert err.value.field == "tags"
    with pytest.raises(RequestError) as err:
        build_request({"text": "x", "tags": {"a": None}})
    assert err.value.field == "tags"


def test_same_text_other_tags_reuses_the_run_and_merges_them(toy_discovery):
    disc = toy_discovery
    first = disc.discover(build_request({"model_id": "toy", "sae_id": "toy", "text": FINANCE[0], "id": "line-1",
                                         "tags": {"domain": "finance", "n": 1}}))
    again = disc.discover(build_request({"model_id": "toy", "sae_id": "toy", "text": FINANCE[0], "id": "line-9",
                                         "tags": {"split": "test", "n": 2}}))
    assert again["run_id"] == first["run_id"] and again["cached"] is True
    con = disc.catalog.raw()
    (n_runs,) = con.execute("SELECT count(*) FROM runs").fetchone()
    batch_id, tags = con.execute("SELECT batch_id, tags FROM v_runs WHERE run_id = ?", [first["run_id"]]).fetchone()
    assert n_runs == 1
    assert batch_id == "line-9"  # the last request that named the run
    assert tags == {"domain": "finance", "n": "2", "split": "test"}  # merged, the newer value for n
    # a run without tags shows an empty map and no batch id
    plain = disc.discover(build_request({"model_id": "toy", "sae_id": "toy", "text": SPORTS[0]}))
    assert con.execute("SELECT batch_id, tags FROM v_runs WHERE run_id = ?", [plain["run_id"]]).fetchone() == (None, {})


def test_tags_round_trip_through_the_cli_batch_and_the_readme_query(toy_registry, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"id": f"f{i}", "text": t, "tags": {"domain": "finance"}} for i, t in enumerate(FINANCE)] + \
            [{"id": f"s{i}", "text": t, "tags": {"domain": "sports", "split": "dev"}} for i, t in enumerate(SPORTS)] + \
            [{"text": "A line without an id or tags."}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    db = tmp_path / "c.duckdb"
    common = ["--db", str(db), "--registry", str(toy_registry)]
    done = run_cli("--model", "toy", "--sae", "toy", "--hooks", "1:mlp_out", "--prompts_file", str(prompts),
                   "--tags", "split=test", "--out", str(tmp_path / "out.jsonl"), "--device", "cpu", *common)
    assert done.returncode == 0, done.stderr
    results = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["f0", "f1", "f2", "s0", "s1", "6"]  # the line number echoed, not stored
    con = duckdb.connect(str(db), read_only=True)
    stored = {rid: (bid, tags) for rid, bid, tags in con.execute("SELECT run_id, batch_id, tags FROM v_runs").fetchall()}
    for line, r in zip(lines, results, strict=True):
        bid, tags = stored[r["run_id"]]
        assert bid == line.get("id")
        want = {"split": "test", **line.get("tags", {})} if "tags" in line else {"split": "test"}
        assert tags == want  # the command line's tags under the line's own
    # the finance-but-not-sports features, independently: every (hook, feature) active in a finance run,
    # minus every one active in a sports run
    acts = con.execute("SELECT r.tags['domain'], a.layer, a.stream, a.feature_id FROM v_activations a "
                       "JOIN v_runs r USING (run_id)").fetchall()
    con.close()
    finance = {(la, st, f) for d, la, st, f in acts if d == "finance"}
    sports = {(la, st, f) for d, la, st, f in acts if d == "sports"}
    expected = finance - sports
    assert expected and finance & sports  # the toy batch has both kinds
    sql = run_cli("sql", _readme_query("finance but not sports"), "--db", str(db), "--format", "json")
    assert sql.returncode == 0, sql.stderr
    got = json.loads(sql.stdout)
    assert {(r["layer"], r["stream"], r["feature_id"]) for r in got} == expected
    assert all(1 <= r["finance_runs"] <= len(FINANCE) for r in got)
    # runs list --tag filters (all of them must hold)
    listed = run_cli("runs", "list", "--tag", "domain=sports", "--tag", "split=dev", "--format", "json", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert page["total"] == len(SPORTS) and {r["batch_id"] for r in page["runs"]} == {"s0", "s1"}
    assert all(r["tags"]["domain"] == "sports" for r in page["runs"])
    by_id = run_cli("runs", "list", "--batch_id", "s1", "nope", "--format", "json", "--db", str(db))  # any of them
    assert by_id.returncode == 0, by_id.stderr
    assert [r["batch_id"] for r in json.loads(by_id.stdout)["runs"]] == ["s1"]
    bad = run_cli("runs", "list", "--tag", "domain", "--db", str(db))
    assert bad.returncode == 2 and bad.stderr.startswith("error: tag: expected KEY=VALUE"), bad.stderr


# -- calibrations pinned and visible ---------------------------------------------------------------

def _ranking(result: dict) -> list[tuple]:
    return [(f["layer"], f["stream"], f["feature_id"], f["score"], f["scores"]["coverage"]) for f in result["features"]]


def test_a_second_calibration_is_named_warned_about_and_the_first_can_be_pinned(toy_discovery, toy_demo, tmp_path):
    disc = toy_discovery
    req = {"model_id": "toy", "sae_id": "toy", "text": FINANCE[1], "layers": [0, 1], "min_coverage_pct": 0}
    first = disc.discover(build_request(req))  # first use calibrates on the registry's corpus
    cal1 = first["calibration_id"]
    assert isinstance(cal1, int)
    assert first["calibration"]["corpus"] == str(toy_demo / "calibration.jsonl")
    assert first["calibration"]["n_tokens"] > 0 and first["calibration"]["corpus_hash"]
    con = disc.catalog.raw()
    assert con.execute("SELECT n_tokens, corpus_hash FROM calibrations WHERE calibration_id = ?", [cal1]).fetchone() \
        == (first["calibration"]["n_tokens"], first["calibration"]["corpus_hash"])
    assert not any("calibration_id" in w for w in first["warnings"])
    # a second, smaller calibration of the same model and SAEs
    small = tmp_path / "small.jsonl"
    small.write_text("".join((toy_demo / "calibration.jsonl").read_text().splitlines(keepends=True)[:4]))
    info = disc.calibrate("toy", "toy", small)
    cal2 = info["calibration_id"]
    assert cal2 > cal1
    # a corpus of 4 documents is too small for stable P95s, and says so with the rule
    assert info["warnings"] and all("fewer than 20 tokens" in w for w in info["warnings"])
    again = rerank(disc.catalog, first["run_id"], {"min_coverage_pct": 0})
    assert again["calibration_id"] == cal2 and again["calibration"]["corpus"] == str(small)
    warning = next(w for w in again["warnings"] if w.startswith("calibration_id:"))
    assert f"first ranked with calibration {cal1}" in warning and f"uses {cal2}" in warning
    assert _ranking(again) != _ranking(first)  # τ and normalization moved
    pinned = rerank(disc.catalog, first["run_id"], {"min_coverage_pct": 0, "calibration_id": cal1})
    assert pinned["calibration_id"] == cal1
    assert _ranking(pinned) == _ranking(first)  # the first ranking exactly
    assert not any(w.startswith("calibration_id:") for w in pinned["warnings"])
    # a cached discovery also says so
    cached = disc.discover(build_request(req))
    assert cached["cached"] and cached["calibration_id"] == cal2
    assert any(w.startswith("calibration_id:") for w in cached["warnings"])
    with pytest.raises(CatalogError) as err:
        rerank(disc.catalog, first["run_id"], {"calibration_id": cal2 + 100})
    assert err.value.field == "calibration_id" and str(cal1) in err.value.message


def test_runs_rank_pins_a_calibration_from_the_cli(toy_registry, tmp_path):
    db = tmp_path / "c.duckdb"
    common = ["--db", str(db), "--registry", str(toy_registry)]
    made = run_cli("--model", "toy", "--sae", "toy", "--text", FINANCE[2], "--out", str(tmp_path / "r.json"),
                   "--device", "cpu", *common)
    assert made.returncode == 0, made.stderr
    result = json.loads(Path(tmp_path / "r.json").read_text())
    ranked = run_cli("runs", "rank", result["run_id"][:8], "--calibration_id", str(result["calibration_id"]),
                     "--out", str(tmp_path / "rank.json"), "--db", str(db))
    assert ranked.returncode == 0, ranked.stderr
    assert json.loads((tmp_path / "rank.json").read_text())["features"] == result["features"]
    bad = run_cli("runs", "rank", result["run_id"][:8], "--calibration_id", "0", "--db", str(db))
    assert bad.returncode == 2 and bad.stderr.startswith("error: calibration_id: expected an integer in [1, "), bad.stderr


# -- ranking in SQL --------------------------------------------------------------------------------

def test_the_readme_feature_scores_query_through_the_sql_command(toy_registry, tmp_path):
    """``feature_scores`` on the read-only ``sql`` command, joined with v_runs and v_labels (the README's
    "where does feature X rank" query): each run's row holds the feature's place and score in that
    run's discovery result."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t, "tags": {"domain": "finance"}}) + "\n" for t in FINANCE))
    db = tmp_path / "c.duckdb"
    done = run_cli("--model", "toy", "--sae", "toy", "--hooks", "1:mlp_out", "--prompts_file", str(prompts),
                   "--min_coverage_pct", "0", "--return_top_x", "1000", "--out", str(tmp_path / "out.jsonl"),
                   "--device", "cpu", "--db", str(db), "--registry", str(toy_registry))
    assert done.returncode == 0, done.stderr
    results = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    feature = results[0]["features"][0]["feature_id"]  # the first run's top feature
    expected = sorted(((i + 1, f["score"], r["run_id"]) for r in results
                       for i, f in enumerate(r["features"]) if f["feature_id"] == feature), key=lambda e: (e[0], e[2]))
    assert len(expected) >= 2
    query = _readme_query("where feature 126 of layer 2 ranks across my runs").replace("'demo'", "'toy'") \
        .replace("s.layer = 2", "s.layer = 1").replace("'resid_pre'", "'mlp_out'") \
        .replace("s.feature_id = 126", f"s.feature_id = {feature}")
    sql = run_cli("sql", query, "--db", str(db), "--format", "json")
    assert sql.returncode == 0, sql.stderr
    rows = json.loads(sql.stdout)
    assert [(r["rank"], r["run_id"]) for r in rows] == [(e[0], e[2]) for e in expected]
    assert [r["score"] for r in rows] == pytest.approx([e[1] for e in expected], rel=1e-12)
    assert all(r["tags"] == {"domain": "finance"} and r["text"] in FINANCE for r in rows)
    con = duckdb.connect(str(db), read_only=True)
    lite = con.execute("SELECT label FROM v_labels WHERE sae_id = 'toy' AND layer = 1 AND stream = 'mlp_out' "
                       "AND feature_id = ? AND source = 'lite'", [feature]).fetchall()
    con.close()
    assert {r["label"] for r in rows} == {lite[0][0] if lite else None}
    # a wrong argument is one line naming it, through the sql command's field
    bad = run_cli("sql", f"SELECT * FROM feature_scores(['{results[0]['run_id']}'], score_mode := 'median')",
                  "--db", str(db))
    assert bad.returncode == 2 and bad.stderr.startswith("error: query:") and "score_mode: expected one of" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
