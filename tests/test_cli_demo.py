"""The README's main job, end to end on the shipped demo, through the real CLI in a subprocess."""

from __future__ import annotations

import duckdb
import pytest

from tests.conftest import read_json, run_cli

PROMPT = "Summarize Q2 earnings for ACME: revenue, EPS, guidance, and margin drivers."
FEATURE_KEYS = {"feature_id", "layer", "stream", "score", "scores", "proto_label", "top_spans"}


def _discover(tmp_path, name: str, *extra: str, db: str = "c.duckdb"):
    out = tmp_path / f"{name}.json"
    proc = run_cli("--db", str(tmp_path / db), *extra, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return read_json(out), proc


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-cli")
    args = ("--prompt", PROMPT, "--generate", "true", "--gen_tokens", "48", "--layers", "2", "--streams", "resid_pre",
            "--return_top_x", "10")
    first, proc = _discover(tmp, "a", *args)
    again, _ = _discover(tmp, "b", *args)
    other_db, _ = _discover(tmp, "c", *args, db="other.duckdb")
    text, _ = _discover(tmp, "t", "--text", "Revenue rose 12% and EPS beat estimates; guidance was raised.",
                        "--layers", "2", "3", "--streams", "resid_pre", "--return_top_x", "10", "--min_coverage_pct", "0")
    return {"tmp": tmp, "first": first, "again": again, "other_db": other_db, "text": text, "stdout": proc.stdout}


def test_prompt_mode_has_the_seed_response_shape(demo_runs):
    r = demo_runs["first"]
    assert r["model_id"] == "demo" and r["sae_id"] == "demo"
    assert r["analyzed"]["mode"] == "prompt+gen"
    assert r["analyzed"]["layers"] == [2]
    assert 0 < r["analyzed"]["tokens"] <= 64  # the default topk_tokens_per_seq
    assert r["threshold_source"] == "calibration_p95" and r["normalization"] == "calibration_max"
    assert 1 <= len(r["features"]) <= 10
    scores = [f["score"] for f in r["features"]]
    assert scores == sorted(scores, reverse=True)
    for f in r["features"]:
        assert set(f) == FEATURE_KEYS
        assert set(f["scores"]) == {"mean", "coverage", "max", "selectivity"}
        assert f["layer"] == 2 and f["stream"] == "resid_pre"
        assert 0.005 <= f["scores"]["coverage"] <= 1  # min_coverage_pct 0.5 → 0.5 %
        assert f["top_spans"] and f["top_spans"][0]["act"] == pytest.approx(f["scores"]["max"], rel=1e-6)
        start, end = f["top_spans"][0]["position"]
        assert 0 <= start < end
    # the readable table on stdout names the features
    assert str(r["features"][0]["feature_id"]) in demo_runs["stdout"]


def test_generated_tokens_are_stored_and_analyzed(demo_runs):
    con = duckdb.connect(str(demo_runs["tmp"] / "c.duckdb"), read_only=True)
    run_id = demo_runs["first"]["run_id"]
    n_gen, n_kept, bos_kept = con.execute(
        "SELECT count(*) FILTER (WHERE is_generated), count(*) FILTER (WHERE kept), "
        "bool_or(kept AND position = 0) FROM v_tokens WHERE run_id = ?", [run_id]).fetchone()
    assert 0 < n_gen <= 48
    assert n_kept == demo_runs["first"]["analyzed"]["tokens"]
    assert not bos_kept
    n_acts, bad = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE NOT t.kept) FROM v_activations a "
        "JOIN v_tokens t USING (run_id, position) WHERE a.run_id = ?", [run_id]).fetchone()
    assert n_acts > 0 and bad == 0  # activation rows exist, for kept tokens only


def test_same_seed_same_tokens_and_scores(demo_runs):
    a, c = demo_runs["first"], demo_runs["other_db"]
    assert a["run_id"] == c["run_id"]
    assert not c["cached"]  # a different catalog: the model really ran again
    query = "SELECT token_id FROM v_tokens WHERE run_id = ? ORDER BY position"
    tok_a = duckdb.connect(str(demo_runs["tmp"] / "c.duckdb"), read_only=True).execute(query, [a["run_id"]]).fetchall()
    tok_c = duckdb.connect(str(demo_runs["tmp"] / "other.duckdb"), read_only=True).execute(query, [a["run_id"]]).fetchall()
    assert len(tok_a) == a["analyzed"]["total_tokens"] and tok_a == tok_c
    assert [(f["feature_id"], f["score"]) for f in a["features"]] == [(f["feature_id"], f["score"]) for f in c["features"]]


def test_second_identical_request_is_served_from_the_catalog(demo_runs):
    a, b = demo_runs["first"], demo_runs["again"]
    assert not a["cached"] and b["cached"]
    assert b["run_id"] == a["run_id"]
    assert "generate_s" not in b["timings"] and "forward_s" not in b["timings"]
    assert b["features"] == a["features"]
    n_runs = duckdb.connect(str(demo_runs["tmp"] / "c.duckdb"), read_only=True).execute(
        "SELECT count(*) FROM v_runs").fetchone()[0]
    assert n_runs == 2  # the prompt run and the text run


def test_text_mode(demo_runs):
    r = demo_runs["text"]
    assert r["analyzed"]["mode"] == "text"
    assert r["analyzed"]["layers"] == [2, 3]
    assert {f["layer"] for f in r["features"]} <= {2, 3}
    con = duckdb.connect(str(demo_runs["tmp"] / "c.duckdb"), read_only=True)
    gen = con.execute("SELECT count(*) FILTER (WHERE is_generated) FROM v_tokens WHERE run_id = ?",
                      [r["run_id"]]).fetchone()[0]
    assert gen == 0


def test_csv_output_has_the_seed_columns(demo_runs, tmp_path):
    out = tmp_path / "r.csv"
    proc = run_cli("--db", str(demo_runs["tmp"] / "c.duckdb"), "--prompt", PROMPT, "--gen_tokens", "48",
                   "--layers", "2", "--return_top_x", "10", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == ("feature_id,layer,stream,score,mean,coverage,max,selectivity,attribution,ablation_delta,"
                        "proto_label,top_span_text")
    assert len(lines) == 1 + len(demo_runs["first"]["features"])


@pytest.mark.parametrize(("args", "field"), [
    ((), "prompt"),
    (("--prompt", "a", "--text", "b"), "text"),
    (("--prompt", "a", "--streams", "resid_middle"), "streams"),
    (("--prompt", "a", "--layers", "6"), "layers"),
    (("--prompt", "a", "--score_mode", "median"), "score_mode"),
    (("--prompt", "a", "--min_coverage_pct", "150"), "min_coverage_pct"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, field):
    db = tmp_path / "bad.duckdb"
    proc = run_cli("--db", str(db), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), proc.stderr
    if db.exists():
        assert duckdb.connect(str(db), read_only=True).execute("SELECT count(*) FROM runs").fetchone()[0] == 0
