"""Drift reports: identical models agree exactly, a planted direction is flagged, and the figures equal a
numpy/scipy recomputation from the stored rows (v_tokens, v_activations, v_feature_stats)."""

from __future__ import annotations

import json
import math
import shutil

import duckdb
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.stats import spearmanr

from catalog.db import Catalog
from catalog.errors import UnknownRun
from sae_discover.drift import build_drift_request, drift_report, table, to_csv, write_report
from sae_discover.registry import Registry
from sae_discover.request import RequestError
from sae_discover.service import Discovery
from tests.conftest import read_json, run_cli

FINANCE = [
    {"text": "Shares of ACME rose 4% after the company beat earnings estimates and raised its dividend."},
    {"text": "The central bank held interest rates steady; bond yields fell and the dollar weakened."},
    {"text": "Quarterly revenue grew while operating margin narrowed, and the stock slipped in late trading.", "id": "q3"},
]
LAYERS = [0, 1]


def _flagged(report: dict) -> int:
    return sum(len(v) for v in report["flagged"].values())


# -- identical models -----------------------------------------------------------------------------

def test_identical_models_agree_and_reuse_runs(toy_discovery):
    report = drift_report(toy_discovery, base="toy", tuned="toy", sae_id="toy", prompts=FINANCE, layers=LAYERS,
                          top_k=10, min_coverage_pct=0)
    o = report["overall"]
    assert (o["jaccard"], o["spearman"], o["spearman_all"]) == (1.0, 1.0, 1.0)
    assert _flagged(report) == 0 and o["n_gained"] == o["n_lost"] == o["n_shifted"] == 0
    assert report["ingested"] == {"new_runs": 3, "cached_runs": 3}  # the same run serves both sides
    assert report["base"]["run_ids"] == report["tuned"]["run_ids"]
    assert [p["id"] for p in report["prompts"]] == ["1", "2", "q3"]
    for p in report["prompts"]:
        assert (p["jaccard"], p["spearman"], p["n_gained"] + p["n_lost"] + p["n_shifted"]) == (1.0, 1.0, 0)
    assert all(f["rank_change"] == 0 and f["score_change"] == 0 for f in report["features"])
    assert "nothing flagged" in table(report)
    assert not report["warnings"]
    twice = drift_report(toy_discovery, base="toy", tuned="toy", sae_id="toy", layers=LAYERS, top_k=10,
                         prompts=[{**FINANCE[0], "id": "x"}, {**FINANCE[0], "id": "y"}])
    assert len(twice["prompts"]) == 1 and twice["warnings"] == [
        "prompts: y makes the same runs as x (same text and run options); compared once"]


def test_a_gate_nothing_passes_says_so_instead_of_agreement(toy_discovery):
    """min_coverage_pct 100: no feature covers every token, so neither side has a feature; the report
    says there is nothing to compare (a warning per side, and in the table) instead of "agree"."""
    report = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE[:1],
                          layers=LAYERS, min_coverage_pct=100)
    o = report["overall"]
    assert (o["n_features_base"], o["n_features_tuned"], report["features"]) == (0, 0, [])
    assert [w.split(":")[0] for w in report["warnings"]] == ["base", "tuned"]
    assert "min_coverage_pct 100" in report["warnings"][0]
    text = table(report)
    assert "nothing to compare: no feature passed the coverage gate on either side" in text
    assert "agree" not in text


def test_same_weights_under_another_id_agree(toy_demo, catalog, tmp_path):
    """Two model ids for one set of weights: distinct run ids, identical activations → nothing drifts."""
    reg = tmp_path / "reg.toml"
    reg.write_text(f'[models.toy]\npath = "{toy_demo / "model"}"\ndefault_layers = [1]\n'
                   f'calibration_corpus = "{toy_demo / "calibration.jsonl"}"\n'
                   f'[models.toy-copy]\npath = "{toy_demo / "model"}"\ndefault_layers = [1]\n'
                   f'[saes.toy]\npath = "{toy_demo / "saes"}"\n')
    disc = Discovery(catalog, Registry.load(reg), device="cpu")
    report = drift_report(disc, {"base": "toy", "tuned": "toy-copy", "sae_id": "toy", "prompts": FINANCE[:2],
                                 "top_k": 8})
    assert report["hooks"] == [[1, "resid_pre"]]  # the base model's default layers
    assert set(report["base"]["run_ids"]).isdisjoint(report["tuned"]["run_ids"])
    o = report["overall"]
    assert (o["jaccard"], o["spearman"], _flagged(report)) == (1.0, 1.0, 0)


# -- the recomputation oracle ---------------------------------------------------------------------

def _recompute(con, base_ids: list[str], tuned_ids: list[str], k: int, min_cov: float, min_change: float,
               min_rel: float, min_shift: int, tau_column: str = "p95", attribution: bool = False,
               per_sae: bool = False) -> dict:
    """Every figure of the report from the stored rows, with numpy and scipy (no shared SQL); τ is the
    stored ``tau_column`` (p95: the default basis, p95_all: tau_basis all). The score is mean×coverage on
    activations normalized by the calibration max (``per_sae``: by each SAE's median of them, normalization
    sae_median_max), or with ``attribution`` the raw sum of the stored attributions (score_mode attribution)."""
    stats = {(layer, stream, f): (p95, mx) for layer, stream, f, p95, mx in con.execute(
        f"SELECT layer, stream, feature_id, {tau_column}, max FROM v_feature_stats WHERE sae_id = 'toy'").fetchall()}
    if per_sae:
        maxima: dict[tuple, list[float]] = {}
        for (layer, stream, _), (_, mx) in stats.items():
            maxima.setdefault((layer, stream), []).append(mx)
        medians = {hook: float(np.median([m for m in v if m > 0])) for hook, v in maxima.items()}
        stats = {key: (p95, medians[key[:2]]) for key, (p95, _) in stats.items()}

    def run_scores(run_id: str) -> dict:
        n = con.execute("SELECT count(*) FROM v_tokens WHERE run_id = ? AND kept", [run_id]).fetchone()[0]
        rows = con.execute("SELECT layer, stream, feature_id, act, attr FROM v_activations WHERE run_id = ? "
                           "AND layer IN (0, 1) AND stream = 'resid_pre'", [run_id]).fetchall()
        acts: dict[tuple, list[tuple[float, float]]] = {}
        for layer, stream, f, act, attr in rows:
            acts.setdefault((layer, stream, f), []).append((act, attr))
        out = {}
        for key, values in acts.items():
            a, attrs = (np.asarray(column, dtype=np.float64) for column in zip(*values, strict=True))
            p95, mx = stats[key]
            div = mx if mx > 0 else 1.0
            coverage = float((a > p95).sum()) / n
            if coverage * 100 >= min_cov:
                out[key] = attrs.sum() if attribution else a.sum() / n / div * coverage
        return out

    sides = {"base": [run_scores(r) for r in base_ids], "tuned": [run_scores(r) for r in tuned_ids]}

    def compare(scores: dict) -> dict:
        feats = sorted(set(scores["base"]) | set(scores["tuned"]))
        res: dict = {"features": {}}
        for side in ("base", "tuned"):
            present = sorted(scores[side], key=lambda key: (-scores[side][key], key))
            res[side] = {key: i + 1 for i, key in enumerate(present)}
        top = {s: {key for key, r in res[s].items() if r <= k} for s in ("base", "tuned")}
        union = sorted(top["base"] | top["tuned"])
        res["jaccard"] = len(top["base"] & top["tuned"]) / len(union) if union else None
        vec = {s: np.array([scores[s].get(key, 0.0) for key in union]) for s in ("base", "tuned")}
        res["spearman"] = float(spearmanr(vec["base"], vec["tuned"]).statistic)
        allv = {s: np.array([scores[s].get(key, 0.0) for key in feats]) for s in ("base", "tuned")}
        res["spearman_all"] = float(spearmanr(allv["base"], allv["tuned"]).statistic)
        for key in union:
            b, t = scores["base"].get(key, 0.0), scores["tuned"].get(key, 0.0)
            rb, rt = res["base"].get(key), res["tuned"].get(key)
            big = abs(t - b) >= min_rel * max(abs(b), abs(t))
            flag = None
            if key in top["tuned"] and key not in top["base"] and t - b > min_change and big:
                flag = "gained"
            elif key in top["base"] and key not in top["tuned"] and b - t > min_change and big:
                flag = "lost"
            elif key in top["base"] and key in top["tuned"] and abs(rb - rt) >= min_shift:
                flag = "shifted"
            res["features"][key] = {"score_base": b, "score_tuned": t, "rank_base": rb, "rank_tuned": rt, "flag": flag}
        return res

    per_prompt = [compare({"base": sides["base"][i], "tuned": sides["tuned"][i]}) for i in range(len(base_ids))]
    agg = {s: {} for s in sides}
    for s, runs in sides.items():
        for scores in runs:
            for key, v in scores.items():
                agg[s][key] = agg[s].get(key, 0.0) + v / len(runs)  # absent prompts count 0
    return {"overall": compare(agg), "prompts": per_prompt}


def _check(report: dict, expected: dict) -> None:
    def close(a, b):
        return (a is None and (b is None or math.isnan(b))) or a == pytest.approx(b, rel=1e-6, abs=1e-9)

    for got, exp in [(report["overall"], expected["overall"]),
                     *zip(report["prompts"], expected["prompts"], strict=True)]:
        assert close(got["jaccard"], exp["jaccard"]), (got, exp["jaccard"])
        assert close(got["spearman"], exp["spearman"]), (got, exp["spearman"])
        assert close(got["spearman_all"], exp["spearman_all"]), (got, exp["spearman_all"])
    exp = expected["overall"]["features"]
    got = {(f["layer"], f["stream"], f["feature_id"]): f for f in report["features"]}
    assert set(got) == set(exp)
    for key, e in exp.items():
        g = got[key]
        assert g["score_base"] == pytest.approx(e["score_base"], rel=1e-5, abs=1e-9)
        assert g["score_tuned"] == pytest.approx(e["score_tuned"], rel=1e-5, abs=1e-9)
        assert (g["rank_base"], g["rank_tuned"], g["flag"]) == (e["rank_base"], e["rank_tuned"], e["flag"]), key
        rank_change = None if e["rank_base"] is None or e["rank_tuned"] is None else e["rank_base"] - e["rank_tuned"]
        assert g["rank_change"] == rank_change


def test_demo_vs_finance_tune_equals_numpy_scipy(toy_discovery, tmp_path):
    opts = {"top_k": 12, "min_coverage_pct": 0.5, "min_relative_change": 0.3, "min_rank_shift": 3}
    report = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE,
                          layers=LAYERS, **opts)
    assert report["threshold_source"] == "calibration_p95" and report["normalization"] == "calibration_max"
    assert report["hooks"] == [[0, "resid_pre"], [1, "resid_pre"]]
    con = toy_discovery.catalog.raw()
    expected = _recompute(con, report["base"]["run_ids"], report["tuned"]["run_ids"], 12, 0.5, 0.0, 0.3, 3)
    _check(report, expected)
    assert report["overall"]["spearman"] < 1.0  # the fine-tune moved something
    # the calibrations that gave τ and normalization are named, and can be pinned
    (base_cal,) = con.execute("SELECT max(c.calibration_id) FROM calibrations c JOIN models m USING (model_key) "
                              "WHERE m.model_id = 'toy'").fetchone()
    assert report["calibration_ids"] == [base_cal] and f"(calibration {base_cal})" in table(report)
    pinned = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE,
                          layers=LAYERS, calibration_id=base_cal, **opts)
    assert pinned["overall"] == report["overall"] and pinned["calibration_ids"] == [base_cal]
    with pytest.raises(RequestError) as err:
        drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE, layers=LAYERS,
                     calibration_id=base_cal + 1000, **opts)
    assert err.value.field == "calibration_id"
    every = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE,
                         layers=LAYERS, tau_basis="all", **opts)  # the same stored runs, the all-token τ
    assert every["threshold_source"] == "calibration_p95_all"
    _check(every, _recompute(con, every["base"]["run_ids"], every["tuned"]["run_ids"], 12, 0.5, 0.0, 0.3, 3,
                             tau_column="p95_all"))
    assert {f["feature_id"] for f in every["features"]} != {f["feature_id"] for f in report["features"]}
    by_sae = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE,
                          layers=LAYERS, normalization="sae_median_max", **opts)
    assert by_sae["normalization"] == "sae_median_max" and by_sae["ingested"]["new_runs"] == 0
    assert "score mean×coverage (normalization sae_median_max) · τ" in table(by_sae).splitlines()[0]
    assert "normalization" not in table(report).splitlines()[0]  # the default divisor goes unsaid
    _check(by_sae, _recompute(con, by_sae["base"]["run_ids"], by_sae["tuned"]["run_ids"], 12, 0.5, 0.0, 0.3, 3,
                              per_sae=True))

    # historical runs only (a bare catalog, no model): ids on one side, a SQL filter on the other → same figures
    again = drift_report(toy_discovery.catalog, base_runs=report["base"]["run_ids"],
                         tuned_runs="model_id = 'toy-finance' AND mode = 'text'", layers=LAYERS, **opts, allow_sql_filter=True)
    assert again["overall"] == report["overall"] and again["features"] == report["features"]
    assert again["ingested"] is None and again["prompts"][0]["text"] == FINANCE[0]["text"]

    # outputs
    csv_text = to_csv(report)
    assert csv_text.splitlines()[0].startswith("feature_id,layer,stream,flag,score_base")
    assert len(csv_text.splitlines()) == len(report["features"]) + 1
    path = write_report(report, tmp_path / "r.json")
    assert json.loads(path.read_text())["overall"] == report["overall"]
    assert "per prompt" in table(report)


def test_attribution_drift_equals_numpy_scipy(toy_discovery):
    """Drift ranked by attribution: the prompts' runs carry an attribution target, and every figure
    equals the recomputation from the stored ``attr`` values; runs without one are refused."""
    opts = {"top_k": 8, "min_coverage_pct": 0.0, "min_relative_change": 0.3, "min_rank_shift": 3}
    report = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE,
                          layers=LAYERS, score_mode="attribution", attribution_target="next_tokens", **opts)
    con = toy_discovery.catalog.raw()
    _check(report, _recompute(con, report["base"]["run_ids"], report["tuned"]["run_ids"], 8, 0.0, 0.0, 0.3, 3,
                              attribution=True))
    assert report["features"] and report["overall"]["spearman"] is not None
    plain = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE[:1],
                         layers=LAYERS, top_k=8)
    with pytest.raises(RequestError, match=r"score_mode: run .* has no attributions"):
        drift_report(toy_discovery.catalog, base_runs=plain["base"]["run_ids"], tuned_runs=plain["tuned"]["run_ids"],
                     layers=LAYERS, score_mode="attribution")
    # a selection that leaves no shared hook names the option that made it: streams alone, or layers
    for selection, field in (({"streams": ["mlp_out"]}, "streams"), ({"layers": [5]}, "layers")):
        with pytest.raises(RequestError, match=rf"^{field}: the runs share no SAE hook among the selected"):
            drift_report(toy_discovery.catalog, base_runs=plain["base"]["run_ids"], tuned_runs=plain["tuned"]["run_ids"],
                         **selection)
    # runs store their target: attributions of another target (other units) are not compared
    con = toy_discovery.catalog.raw()
    targets = dict(con.execute("SELECT run_id, attribution_target FROM v_runs").fetchall())
    con.close()
    assert {targets[r] for r in report["base"]["run_ids"] + report["tuned"]["run_ids"]} == {"next_tokens"}
    assert {targets[r] for r in plain["base"]["run_ids"]} == {"none"}
    other = drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", prompts=FINANCE[:1],
                         layers=LAYERS, score_mode="attribution", attribution_target="token: the", **opts)
    with pytest.raises(RequestError, match=r"score_mode: the runs' attribution targets differ \(next_tokens, "
                                           r"token: the\)"):
        drift_report(toy_discovery.catalog, base_runs=report["base"]["run_ids"][:1],
                     tuned_runs=other["tuned"]["run_ids"], layers=LAYERS, score_mode="attribution")
    # prompts of different targets: refused from the request, before any run is made
    n_runs = len(targets)
    with pytest.raises(RequestError, match=r"score_mode: the runs' attribution targets differ \(next_tokens, "
                                           r"token: the\)"):
        drift_report(toy_discovery, base="toy", tuned="toy-finance", sae_id="toy", layers=LAYERS,
                     score_mode="attribution", prompts=[{"text": "Fresh words one.", "attribution_target": "next_tokens"},
                                                        {"text": "Fresh words two.", "attribution_target": "token: the"}])
    con = toy_discovery.catalog.raw()
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == n_runs + 2  # (other's two runs)
    con.close()


# -- a planted change -----------------------------------------------------------------------------

def test_planted_decoder_direction_is_flagged_gained(toy_demo, toy_discovery, tmp_path):
    """Add a multiple of one SAE decoder direction to the bias that block 0 writes into the residual:
    resid_pre of layer 1 carries it on every token, so that feature must be flagged gained."""
    base = drift_report(toy_discovery, base="toy", tuned="toy", sae_id="toy", prompts=FINANCE, layers=[1], top_k=5)
    seen = {f["feature_id"] for f in base["features"]}
    w = load_file(str(toy_demo / "saes" / "blocks.1.hook_resid_pre" / "sae_weights.safetensors"))
    d_sae = w["W_dec"].shape[0]
    con = toy_discovery.catalog.raw()
    fired = dict(con.execute("SELECT feature_id, count(*) FROM v_activations WHERE layer = 1 AND stream = 'resid_pre' "
                             "AND list_contains(?, run_id) GROUP BY ALL", [base["base"]["run_ids"]]).fetchall())
    live = {r[0] for r in con.execute("SELECT feature_id FROM v_feature_stats WHERE layer = 1 AND stream = 'resid_pre' "
                                      "AND max > 0").fetchall()}
    target = min((f for f in range(d_sae) if f not in seen and f in live), key=lambda f: (fired.get(f, 0), f))
    planted = tmp_path / "toy-planted"
    shutil.copytree(toy_demo / "model", planted)
    weights = load_file(str(planted / "model.safetensors"))
    bias = next(k for k in weights if k.endswith("h.0.mlp.c_proj.bias"))
    direction = w["W_dec"][target] / np.linalg.norm(w["W_dec"][target])
    weights[bias] = (weights[bias] + 4.0 * direction * np.linalg.norm(weights[bias]).clip(1.0)).astype(weights[bias].dtype)
    save_file(weights, str(planted / "model.safetensors"), metadata={"format": "pt"})

    report = drift_report(toy_discovery, base="toy", tuned=str(planted), sae_id="toy", prompts=FINANCE, layers=[1],
                          top_k=5)
    gained = {f["feature_id"]: f for f in report["flagged"]["gained"]}
    assert target in gained, table(report)
    g = gained[target]
    assert (g["rank_base"] is None or g["rank_base"] > 5) and g["rank_tuned"] is not None and g["rank_tuned"] <= 5
    assert g["prompts_tuned"] == len(FINANCE) and g["score_change"] > 0
    assert report["overall"]["jaccard"] < 1.0
    assert target not in {f["feature_id"] for f in report["flagged"]["lost"]}


# -- validation and the CLI -----------------------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    ({"base": "toy", "tuned": "toy"}, "prompts"),
    ({"base": "toy", "prompts": [{"text": "x"}]}, "tuned"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x"}], "base_runs": ["abc"]}, "base_runs"),
    ({"base_runs": ["abcdef01"]}, "tuned_runs"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x"}], "top_k": 0}, "top_k"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x", "score_mode": "max"}]}, "prompts"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x", "prompt": "y"}]}, "prompts"),
    ({"base": "toy", "tuned": "toy", "prompts": ["x"]}, "prompts"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x"}], "min_relative_change": -1}, "min_relative_change"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x"}], "frobnicate": 1}, "frobnicate"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x"}], "score_mode": "median"}, "score_mode"),
    # an attribution mode over prompts made without a target: refused before any run is made
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x"}], "score_mode": "attribution"}, "attribution_target"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "x", "attribution_target": "next_tokens"}, {"text": "y"}],
      "score_mode": "attribution_abs"}, "attribution_target"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(RequestError) as info:
        build_drift_request(body)
    assert info.value.field == field


def test_bad_run_selections(catalog):
    with pytest.raises(UnknownRun, match="base_runs: no run 'feedface00'"):  # the API's 404
        drift_report(catalog, base_runs=["feedface00"], tuned_runs=["feedface00"])
    with pytest.raises(RequestError, match="base_runs: not a valid SQL filter"):
        drift_report(catalog, base_runs="true; DROP TABLE runs", tuned_runs="true", allow_sql_filter=True)
    with pytest.raises(RequestError, match="base_runs: expected one boolean SQL expression"):
        drift_report(catalog, base_runs="true); DROP TABLE runs; SELECT (1", tuned_runs="true", allow_sql_filter=True)
    with pytest.raises(RequestError, match=r"base_runs: the filter .* matches no run"):
        drift_report(catalog, base_runs="model_id = 'nope'", tuned_runs="true", allow_sql_filter=True)
    with pytest.raises(RequestError, match="SQL filters are disabled"):
        drift_report(catalog, base_runs="true", tuned_runs="true", allow_sql_filter=False)
    with pytest.raises(RequestError, match="needs a model"):
        drift_report(catalog, base="toy", tuned="toy", prompts=[{"text": "x"}])
    assert catalog.raw().execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_cli_drift_from_stored_runs(toy_registry, tmp_path):
    db = tmp_path / "cli.duckdb"
    cat = Catalog(db)
    try:
        report = drift_report(Discovery(cat, Registry.load(toy_registry), device="cpu"), base="toy",
                              tuned="toy-finance", sae_id="toy", prompts=FINANCE[:2], layers=[1], top_k=10)
    finally:
        cat.close()
    ids = report["base"]["run_ids"]
    res = run_cli("drift", "--db", str(db), "--base_runs", *ids, "--tuned_runs", "model_id", "=", "'toy-finance'",
                  "--layers", "1", "--top_k", "10", "--out", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert "Jaccard@10" in res.stdout and "per prompt" in res.stdout
    assert read_json(tmp_path / "r.json")["overall"] == report["overall"]
    res = run_cli("drift", "--db", str(db), "--base_runs", *ids, "--tuned_runs", "model_id", "=", "'toy-finance'",
                  "--layers", "1", "--out", str(tmp_path / "r.csv"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r.csv").read_text().startswith("feature_id,layer,stream,flag")
    # selection mistakes: a run on both sides (a filter matching every run), a word too short for a run id
    # (as a filter, `4` would be true for every run), run options that stored runs cannot take
    for args, field, words in (
            ((*ids, "--tuned_runs", *ids), "tuned_runs", f"run {ids[0]} is on both sides"),
            (("true", "--tuned_runs", "model_id", "=", "'toy-finance'"), "tuned_runs", "is on both sides"),
            (("4", "--tuned_runs", *ids), "base_runs", "at least 6 hex characters"),
            ((ids[0][:5], "--tuned_runs", *ids), "base_runs", f"got {ids[0][:5]!r}"),
            ((*ids, "--tuned_runs", "model_id", "=", "'toy-finance'", "--seed", "3"), "seed",
             "run options apply only to runs made from prompts")):
        res = run_cli("drift", "--db", str(db), "--base_runs", *args, "--layers", "1")
        assert res.returncode == 2 and res.stderr.startswith(f"error: {field}: ") and words in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    mixed = run_cli("drift", "--db", str(db), "--base_runs", "true", "--tuned_runs", "false", "--layers", "1")
    assert mixed.returncode == 2 and "tuned_runs" in mixed.stderr  # matches no run
    res = run_cli("drift", "--db", str(db), "--base_runs", "model_id = 'toy'", "--tuned_runs", "oops(")
    assert res.returncode == 2 and res.stderr.startswith("error: tuned_runs:")


def test_a_tuned_model_that_cannot_load_stores_no_base_run(toy_registry, tmp_path):
    """Both models are resolved (config, SAEs, hooks) before any run is stored: a missing tuned model is
    named as ``tuned`` and the catalog holds no run of the base model afterwards."""
    db, prompts, empty = tmp_path / "c.duckdb", tmp_path / "p.jsonl", tmp_path / "empty-model"
    prompts.write_text(json.dumps({"text": FINANCE[0]["text"]}) + "\n")
    empty.mkdir()  # a directory without a model: found, then its config cannot be read
    for tuned, words in ((tmp_path / "no-model", "neither a registered model id nor an existing directory"),
                         (empty, "")):
        res = run_cli("drift", "--registry", str(toy_registry), "--db", str(db), "--base", "toy", "--tuned",
                      str(tuned), "--sae", "toy", "--prompts_file", str(prompts), "--layers", "1")
        assert res.returncode == 2 and res.stderr.startswith("error: tuned: ") and words in res.stderr, res.stderr
    if db.exists():
        con = duckdb.connect(str(db), read_only=True)
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        con.close()
