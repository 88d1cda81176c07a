"""Batch ingest: micro-batched results equal one-at-a-time runs; errors per line; SIGKILL leaves whole runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from catalog.db import Catalog
from sae_discover.registry import Registry
from sae_discover.request import build_request
from sae_discover.service import Discovery
from tests.conftest import ROOT

LINES = [
    {"id": "a", "text": "Shares of Globex rose 12% after the earnings call."},
    {"id": "b", "prompt": "The forecast for Boston calls for", "gen_tokens": 12, "seed": 3},
    {"id": "c", "text": "Preheat the oven to 350 degrees and bake the apple pie for 45 minutes.", "topk_tokens_per_seq": 5},
    {"id": "d", "prompt": "In Python, a list comprehension", "gen_tokens": 20, "token_proxy": "norm"},
    {"id": "e", "text": "The patient presented with fever."},
]


def _features(result: dict) -> list[tuple]:
    return [(f["layer"], f["feature_id"], round(f["score"], 5), round(f["scores"]["coverage"], 6))
            for f in result["features"]]


def test_micro_batched_results_equal_one_at_a_time(toy_registry, tmp_path):
    reqs = [build_request({"model_id": "toy", "sae_id": "toy", "layers": [0, 1], "min_coverage_pct": 0, **line})
            for line in LINES]
    batched_cat, single_cat = Catalog(tmp_path / "b.duckdb"), Catalog(tmp_path / "s.duckdb")
    batched = Discovery(batched_cat, Registry.load(toy_registry), device="cpu").discover_many(reqs, batch_size=4)
    single_disc = Discovery(single_cat, Registry.load(toy_registry), device="cpu")
    singles = [single_disc.discover(r) for r in reqs]
    for b, s in zip(batched, singles, strict=True):
        assert b["run_id"] == s["run_id"] and b["analyzed"] == s["analyzed"]
        assert _features(b) == _features(s)
        # ranked as one group (one set of statements for all runs): spans and labels as when ranked alone
        for fb, fs in zip(b["features"], s["features"], strict=True):
            assert fb["proto_label"] == fs["proto_label"]
            assert [(x["text"], x["position"]) for x in fb["top_spans"]] == [(x["text"], x["position"]) for x in fs["top_spans"]]
            assert [x["act"] for x in fb["top_spans"]] == pytest.approx([x["act"] for x in fs["top_spans"]], rel=1e-4)
        assert sum(len(f["top_spans"]) for f in b["features"]) > 0
    tok_b = batched_cat.raw().execute("SELECT run_id, position, token_id, kept FROM v_tokens ORDER BY ALL").fetchall()
    tok_s = single_cat.raw().execute("SELECT run_id, position, token_id, kept FROM v_tokens ORDER BY ALL").fetchall()
    assert tok_b == tok_s
    batched_cat.close()
    single_cat.close()


def test_a_batch_ranks_repeats_and_aliased_models_as_single_requests_would(toy_demo, tmp_path):
    """Requests ranked together must get what each gets alone: a repeated line (the same run twice)
    and two registry ids for one model folder (each calibrates and is thresholded on its own)."""
    registry = tmp_path / "reg.toml"
    entry = f'path = "{toy_demo / "model"}"\ndefault_layers = [1]\ncalibration_corpus = "{toy_demo / "calibration.jsonl"}"\n'
    registry.write_text(f"[models.toy]\n{entry}[models.toy-alias]\n{entry}[saes.toy]\npath = \"{toy_demo / 'saes'}\"\n")
    line = {"sae_id": "toy", "min_coverage_pct": 0, "text": LINES[0]["text"]}
    reqs = [build_request({**line, "model_id": model, "id": str(n)}) for n, model in enumerate(["toy", "toy", "toy-alias"])]
    together = Discovery(Catalog(tmp_path / "t.duckdb"), Registry.load(registry), device="cpu").discover_many(reqs)
    single = Discovery(Catalog(tmp_path / "s.duckdb"), Registry.load(registry), device="cpu")
    for got, req in zip(together, reqs, strict=True):
        alone = single.discover(req)
        assert got["threshold_source"] == alone["threshold_source"] == "calibration_p95"
        assert _features(got) == _features(alone) and got["features"]
    assert together[0]["run_id"] == together[1]["run_id"] != together[2]["run_id"]


def test_a_batch_background_contrasts_each_line_with_the_whole_files_other_lines(toy_registry, tmp_path):
    """``background: batch`` ranks the whole file as one group (not chunk by chunk): each line's
    selectivity is its mean minus the mean over every other line's analysed tokens (leave-one-out),
    computed here with numpy from the stored codes — also for lines that override a ranking option
    (ranked apart, as their options differ, but contrasted with the whole file all the same)."""
    import numpy as np

    from sae_discover.batch import run_batch

    overrides = [{}, {"normalization": "none"}, {"return_top_x": 999}]
    lines = [(n, {"id": str(n), "text": LINES[i]["text"], **overrides[n]}) for n, i in enumerate([0, 2, 4])]
    defaults = {"model_id": "toy", "sae_id": "toy", "layers": [1], "score_mode": "selectivity", "background": "batch",
                "min_coverage_pct": 0, "return_top_x": 1000, "attach_examples": False}
    cat = Catalog(tmp_path / "c.duckdb")
    out, n_err = run_batch(Discovery(cat, Registry.load(toy_registry), device="cpu"), lines, defaults,
                           tmp_path / "o.jsonl", chunk=2)
    assert n_err == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    con = cat.raw()
    n_kept = dict(con.execute("SELECT run_id, n_kept FROM v_runs").fetchall())
    d = max(f for (f,) in con.execute("SELECT feature_id FROM v_activations").fetchall()) + 1
    sums = {run: np.zeros(d) for run in n_kept}
    for run, f, act in con.execute("SELECT run_id, feature_id, act FROM v_activations WHERE layer = 1").fetchall():
        sums[run][f] += act
    for row in rows:
        run = row["run_id"]
        assert row["background"] == "batch"  # the result says what selectivity compared with
        assert row["normalization"] == ("none" if row["id"] == "1" else "calibration_max")
        others = [r for r in n_kept if r != run]
        background = sum(sums[r] for r in others) / sum(n_kept[r] for r in others)
        mean = sums[run] / n_kept[run]
        assert {f["feature_id"] for f in row["features"]} == set(np.flatnonzero(mean).tolist())
        for f in row["features"]:
            assert f["scores"]["selectivity"] == pytest.approx(mean[f["feature_id"]] - background[f["feature_id"]],
                                                               rel=1e-4, abs=1e-6)
    cat.close()


def _batch_cmd(registry, db, prompts, out):
    return [sys.executable, "-m", "sae_discover", "--registry", str(registry), "--db", str(db), "--model", "toy",
            "--sae", "toy", "--layers", "1", "--prompts_file", str(prompts), "--out", str(out)]


def test_batch_cli_keeps_order_reports_bad_lines_and_goes_on(toy_registry, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([json.dumps(LINES[0]), "{not json", json.dumps({"id": "x", "prompt": "a", "layers": [9]}),
                                  json.dumps(LINES[2]), json.dumps({"id": {"x": 1}, "prompt": "b"}),
                                  json.dumps({"id": None, "text": LINES[0]["text"]})]) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(_batch_cmd(toy_registry, tmp_path / "c.duckdb", prompts, out), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr  # some lines failed: exit 1, with the summary line
    assert f"wrote {out} (6 lines, 3 ok, 3 failed)" in proc.stdout
    assert "discover" in proc.stderr  # the progress bar
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "2", "x", "c", "5", "6"]  # a null id: the line number
    assert "features" in rows[0] and "features" in rows[3]
    assert rows[1]["error"].startswith("prompts_file: line 2: not JSON")
    assert rows[2]["error"].startswith("layers: layer 9 is out of range")
    assert rows[4]["error"] == 'id: expected a string or an integer, got an object {"x": 1}'  # not stored as its repr
    # a file of blank lines is refused before anything runs: the results of the run above stay
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    before = out.read_text()
    proc = subprocess.run(_batch_cmd(toy_registry, tmp_path / "c.duckdb", blank, out), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: prompts_file: {blank} holds no lines"), proc.stderr
    assert out.read_text() == before


def test_sigkill_mid_batch_leaves_only_whole_runs_and_the_rerun_completes(toy_registry, tmp_path):
    prompts = tmp_path / "p.jsonl"
    n_lines = 48
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"Report number {i}: revenue", "gen_tokens": 24,
                                           "seed": i}) + "\n" for i in range(n_lines)))
    db, out = tmp_path / "c.duckdb", tmp_path / "out.jsonl"
    proc = subprocess.Popen(_batch_cmd(toy_registry, db, prompts, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    if written >= n_lines:
        pytest.fail("the batch finished before it could be killed; make it longer")
    con = duckdb.connect(str(db))
    runs = con.execute("SELECT run_id, n_tokens, n_kept FROM v_runs").fetchall()
    assert len(runs) >= 1
    for run_id, n_tokens, n_kept in runs:  # every visible run is whole
        tokens, kept = con.execute("SELECT count(*), count(*) FILTER (WHERE kept) FROM v_tokens WHERE run_id = ?",
                                   [run_id]).fetchone()
        assert (tokens, kept) == (n_tokens, n_kept)
        outside = con.execute("SELECT count(*) FROM v_activations a JOIN v_tokens t USING (run_id, position) "
                              "WHERE a.run_id = ? AND NOT t.kept", [run_id]).fetchone()[0]
        assert outside == 0
        assert con.execute("SELECT count(*) FROM v_activations WHERE run_id = ?", [run_id]).fetchone()[0] > 0
    before = len(runs)
    con.close()
    proc = subprocess.run(_batch_cmd(toy_registry, db, prompts, out), capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(n_lines)]
    assert sum(r["cached"] for r in rows) == before  # finished runs were skipped, the rest computed
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM v_runs").fetchone()[0] == n_lines


def test_worker_processes_feed_one_writer_with_the_same_results(toy_demo, tmp_path):
    registry = tmp_path / "reg.toml"  # no calibration corpus: nothing makes this process load the model
    registry.write_text(f'[models.toy]\npath = "{toy_demo / "model"}"\n[saes.toy]\npath = "{toy_demo / "saes"}"\n')
    toy_registry = registry
    reqs = [build_request({"model_id": "toy", "sae_id": "toy", "layers": [1], "min_coverage_pct": 0, **line})
            for line in LINES]
    pooled_cat, single_cat = Catalog(tmp_path / "p.duckdb"), Catalog(tmp_path / "s.duckdb")
    pooled_disc = Discovery(pooled_cat, Registry.load(toy_registry), device="cpu")
    pooled = pooled_disc.discover_many(reqs, batch_size=2, workers=2)
    assert pooled_disc.loaded_models() == []  # this process never loaded the model: the workers did
    singles = Discovery(single_cat, Registry.load(toy_registry), device="cpu").discover_many(reqs)
    assert [r["run_id"] for r in pooled] == [r["run_id"] for r in singles]
    for p, s in zip(pooled, singles, strict=True):
        assert _features(p) == _features(s)
    assert pooled_cat.raw().execute("SELECT count(*) FROM runs").fetchone()[0] == len(LINES)
    pooled_cat.close()
    single_cat.close()
