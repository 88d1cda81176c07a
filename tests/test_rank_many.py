"""``runs rank`` over several stored runs (ids, ``--tag``, ``--batch_id``) and ``POST /v1/runs/rank``:
ranked together, so ``background batch`` contrasts each run with the others — checked against a numpy
leave-one-out over ``v_activations`` and against batch mode's own result for the same prompts."""

from __future__ import annotations

import csv
import json

import duckdb
import numpy as np
import pytest

from tests.conftest import read_json, run_cli

TEXTS = [("a", "finance", "Shares of Hooli fell 9% after the company missed on churn and cut guidance."),
         ("b", "finance", "The central bank raised rates by a quarter point; bond yields climbed."),
         ("c", "sport", "The striker scored twice in the second half and the home side won the cup.")]
BATCH = ["--score_mode", "selectivity", "--background", "batch"]
ALL_ROWS = ["--min_coverage_pct", "0", "--return_top_x", "1000", "--attach_examples", "false"]


@pytest.fixture(scope="module")
def stored(toy_registry, tmp_path_factory):
    """Three text runs made by batch mode with ``background batch`` (its JSONL is one oracle), tagged by domain."""
    tmp = tmp_path_factory.mktemp("rank-many")
    db, prompts, out = tmp / "c.duckdb", tmp / "p.jsonl", tmp / "batch.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": t, "tags": {"domain": d}}) + "\n" for i, d, t in TEXTS))
    proc = run_cli("--registry", str(toy_registry), "--db", str(db), "--model", "toy", "--sae", "toy", "--layers", "1",
                   "--prompts_file", str(prompts), "--out", str(out), *BATCH, *ALL_ROWS)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "b", "c"] and all("error" not in line for line in lines)
    return {"db": db, "tmp": tmp, "batch": {line["id"]: line for line in lines},
            "ids": {line["id"]: line["run_id"] for line in lines}, "registry": toy_registry}


def rank(stored, *args: str):
    return run_cli("runs", "rank", *args, "--db", str(stored["db"]))


def leave_one_out(db, run_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per run: (its mean per feature, the mean over the other runs' analysed tokens), from v_activations."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        n_kept = dict(con.execute("SELECT run_id, n_kept FROM v_runs WHERE list_contains(?, run_id)", [run_ids]).fetchall())
        acts = con.execute("SELECT run_id, feature_id, act FROM v_activations WHERE layer = 1 "
                           "AND list_contains(?, run_id)", [run_ids]).fetchall()
    finally:
        con.close()
    d = max(f for _, f, _ in acts) + 1
    sums = {r: np.zeros(d) for r in run_ids}
    for run, f, act in acts:
        sums[run][f] += act
    return {r: (sums[r] / n_kept[r], sum(sums[o] for o in run_ids if o != r) / sum(n_kept[o] for o in run_ids if o != r))
            for r in run_ids}


def assert_leave_one_out(results: list[dict], oracle: dict, complete: bool = True) -> None:
    """Each result's selectivity is its mean minus the others' (``complete``: every nonzero feature is listed)."""
    for result in results:
        mean, background = oracle[result["run_id"]]
        if complete:
            assert {f["feature_id"] for f in result["features"]} == set(np.flatnonzero(mean).tolist())
        for f in result["features"]:
            expected = mean[f["feature_id"]] - background[f["feature_id"]]
            assert f["scores"]["selectivity"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def by_feature(result: dict) -> dict[int, tuple]:
    return {f["feature_id"]: (pytest.approx(f["score"], rel=1e-6), pytest.approx(f["scores"]["selectivity"], rel=1e-6))
            for f in result["features"]}


def test_several_run_ids_ranked_with_a_batch_background_match_numpy_and_batch_mode(stored):
    ids = stored["ids"]
    out = stored["tmp"] / "ranked.json"
    proc = rank(stored, ids["c"], ids["a"][:8], ids["b"], *BATCH, *ALL_ROWS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = read_json(out)
    assert [r["run_id"] for r in results] == [ids["c"], ids["a"], ids["b"]]  # the order given
    assert all(r["cached"] and r["score_mode"] == "selectivity" for r in results)
    assert_leave_one_out(results, leave_one_out(stored["db"], list(ids.values())))
    for key, run_id in ids.items():  # the same numbers as batch mode gave these prompts
        assert by_feature(next(r for r in results if r["run_id"] == run_id)) == by_feature(stored["batch"][key])
    assert proc.stdout.count("analyzed tokens") == 3  # one table per run


def test_a_tag_or_batch_id_selection_ranks_only_its_runs_together(stored):
    ids = stored["ids"]
    finance = [ids["a"], ids["b"]]
    oracle = leave_one_out(stored["db"], finance)  # the sport run is not in the contrast set
    for selection in (["--tag", "domain=finance"], ["--batch_id", "a", "b"], [ids["a"], "--batch_id", "b"]):
        out = stored["tmp"] / "selected.json"
        proc = rank(stored, *selection, *BATCH, *ALL_ROWS, "--out", str(out))
        assert proc.returncode == 0, (selection, proc.stderr)
        results = read_json(out)
        assert [r["run_id"] for r in results] == finance, selection  # oldest first, each run once
        assert_leave_one_out(results, oracle)
    assert by_feature(results[0]) != by_feature(stored["batch"]["a"])  # a smaller group: another background


def test_the_selection_writes_csv_with_a_run_id_column(stored):
    out = stored["tmp"] / "ranked.csv"
    proc = rank(stored, "--tag", "domain=finance", "--score_mode", "max", "--return_top_x", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["run_id"] for r in rows] == [stored["ids"]["a"]] * 2 + [stored["ids"]["b"]] * 2
    side = read_json(out.with_name(out.name + ".analyzed.json"))
    assert [s["run_id"] for s in side] == [stored["ids"]["a"], stored["ids"]["b"]]


def test_one_run_id_alone_is_ranked_as_before(stored):
    ids = stored["ids"]
    single = rank(stored, ids["a"], "--format", "json", "--score_mode", "max", *ALL_ROWS, "--out",
                  str(stored["tmp"] / "one.json"))
    assert single.returncode == 0, single.stderr
    one = read_json(stored["tmp"] / "one.json")
    assert isinstance(one, dict) and one["run_id"] == ids["a"]
    # a score that does not depend on the group: the same ranked with the others
    many = rank(stored, ids["a"], ids["c"], "--score_mode", "max", *ALL_ROWS, "--out", str(stored["tmp"] / "m.json"))
    assert many.returncode == 0, many.stderr
    assert read_json(stored["tmp"] / "m.json")[0]["features"] == one["features"]
    alone = rank(stored, ids["a"], *BATCH)  # one run has nothing to contrast with: refused, as before
    assert alone.returncode == 2 and alone.stderr.startswith("error: background:"), alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "field"), [
    (["ffffff0000", "{a}"], "run_ids"),  # an unknown id among several
    (["ffffff0000"], "run_ids"),  # an unknown id alone (re-ranked as one run)
    (["{a}", "xyz"], "run_ids"),  # not a run id at all
    ([], "run_ids"),  # nothing to rank
    (["--tag", "domain=chess"], "tag"),  # a selection of no run
    (["--tag", "domain"], "tag"),  # not KEY=VALUE
    (["--batch_id", "zzz"], "batch_id"),
    (["{a}", "{b}", "--background_text", "x"], None),  # not a ranking option: argparse refuses the flag
])
def test_bad_selections_are_refused_naming_the_field(stored, args, field):
    proc = rank(stored, *(a.format(**stored["ids"]) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    if field:
        assert proc.stderr.startswith(f"error: {field}: "), proc.stderr


def test_the_api_ranks_several_runs_together(stored, tmp_path):
    from tests.test_api import Server, assert_error

    ids = stored["ids"]
    oracle = leave_one_out(stored["db"], list(ids.values()))  # before the server holds the file
    srv = Server(stored["db"], stored["registry"], tmp_path / "server.log")
    try:
        body = {"score_mode": "selectivity", "background": "batch", "min_coverage_pct": 0, "return_top_x": 50,
                "attach_examples": False}
        r = srv.client.post("/v1/runs/rank", json={**body, "run_ids": list(ids.values())})
        assert r.status_code == 200, r.text
        results = r.json()
        assert [x["run_id"] for x in results] == list(ids.values())
        assert all(x["features"] for x in results)
        assert_leave_one_out(results, oracle, complete=False)
        tagged = srv.client.post("/v1/runs/rank", json={**body, "tag": ["domain:finance"]}).json()
        assert [x["run_id"] for x in tagged] == [ids["a"], ids["b"]]
        assert srv.client.get(f"/v1/runs/{ids['a']}").status_code == 200  # the run route still answers
        assert_error(srv.client.post("/v1/runs/rank", json={"run_ids": ["ffffff0000"]}), 404, "run_ids")
        assert_error(srv.client.post("/v1/runs/rank", json={}), 400, "run_ids")
        assert_error(srv.client.post("/v1/runs/rank", json={"tag": ["domain:chess"]}), 400, "tag")
        assert_error(srv.client.post("/v1/runs/rank", json={"run_ids": [ids["a"]], "gen_tokens": 5}), 400, "gen_tokens")
        assert_error(srv.client.post("/v1/runs/rank", json={"run_ids": [ids["a"]], **body}), 400, "background")
    finally:
        srv.stop()


def test_a_run_alone_in_its_group_is_named_and_a_restrict_set_is_checked(stored, tmp_path):
    """A batch background over runs of different restrict sets: the run that has no one to be contrasted
    with is named, with why; a restrict set beyond the SAE is refused as discovery refuses it."""
    import shutil

    db = tmp_path / "c.duckdb"
    shutil.copy(stored["db"], db)
    made = run_cli("--registry", str(stored["registry"]), "--db", str(db), "--model", "toy", "--sae", "toy",
                   "--layers", "1", "--text", TEXTS[0][2], "--restrict_features", "1", "2", "3",
                   "--out", str(tmp_path / "r.json"))
    assert made.returncode == 0, made.stderr
    restricted = read_json(tmp_path / "r.json")["run_id"]
    ids = stored["ids"]
    proc = run_cli("runs", "rank", ids["a"], ids["b"], restricted, *BATCH, "--db", str(db))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: background: batch contrasts runs of the same model, SAEs and restrict "
                                  f"set; run {restricted} was made with a different restrict set"), proc.stderr
    # two runs, each alone in its group: the first is named, with what differs from the other
    proc = run_cli("runs", "rank", ids["a"], restricted, *BATCH, "--db", str(db))
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: background: batch contrasts runs of the same model, SAEs and restrict set; run {ids['a']} was made "
        f"with a different restrict set from run {restricted} and is alone in its group"), proc.stderr
    con = duckdb.connect(str(db), read_only=True)
    (d_sae,) = con.execute("SELECT max(d_sae) FROM saes").fetchone()
    con.close()
    beyond = run_cli("runs", "rank", ids["a"], "--restrict_features", str(d_sae), "--db", str(db))
    assert beyond.returncode == 2, beyond.stderr
    assert beyond.stderr.startswith(f"error: restrict_features: feature {d_sae} is beyond the {d_sae} features"), \
        beyond.stderr
    inside = run_cli("runs", "rank", ids["a"], "--restrict_features", str(d_sae - 1), "--db", str(db))
    assert inside.returncode == 0, inside.stderr
    # features the restricted run never stored: ranked without them, and said
    out = tmp_path / "outside.json"
    proc = run_cli("runs", "rank", restricted, "--restrict_features", "2", "7", "9", "--min_coverage_pct", "0",
                   "--db", str(db), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    got = read_json(out)
    assert {f["feature_id"] for f in got["features"]} <= {2}
    assert f"restrict_features: run {restricted} was made with restrict_features 1, 2, 3: features 7, 9 were never " \
           "stored" in " ".join(got["warnings"])
