"""Scores and calibration statistics against numpy on dense SAE codes (independent of our encode/SQL)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_discover.request import build_request


def dense_codes(sae_dir, x: np.ndarray) -> np.ndarray:
    """The SAELens formulas in numpy, from the files on disk."""
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(sae_dir / "sae_weights.safetensors")).items()}
    pre = (x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        out = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, : cfg["k"]]
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, axis=1), 0), axis=1)
        return out
    return np.maximum(pre, 0)


def hidden(model_dir, ids: list[list[int]], layer: int) -> list[np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[layer][0].numpy()
                for s in ids]


@pytest.mark.parametrize(("layer", "stream"), [(1, "resid_pre"), (1, "mlp_out")])
def test_calibration_stats_equal_numpy_on_dense_codes(toy_demo, toy_discovery, layer, stream):
    info = toy_discovery.calibrate("toy", "toy", toy_demo / "calibration.jsonl", [(layer, stream)])
    con = toy_discovery.catalog.raw()
    toks = con.execute("SELECT doc, position, token_id FROM calibration_tokens WHERE calibration_id = ? "
                       "ORDER BY doc, position", [info["calibration_id"]]).fetchall()
    docs = sorted({d for d, _, _ in toks})
    tok = AutoTokenizer.from_pretrained(toy_demo / "model")
    texts = [json.loads(line)["text"] for line in (toy_demo / "calibration.jsonl").read_text().splitlines()]
    seqs = [[tok.bos_token_id, *tok(texts[d], add_special_tokens=False)["input_ids"]][:64] for d in docs]
    model = AutoModelForCausalLM.from_pretrained(toy_demo / "model").eval()
    sae_dir = toy_demo / "saes" / f"blocks.{layer}.hook_{stream}"
    rows = []
    out: list[torch.Tensor] = []
    block = model.transformer.h[layer]
    handle = (block.mlp.register_forward_hook(lambda m, i, o: out.append(o)) if stream == "mlp_out"
              else block.register_forward_pre_hook(lambda m, a: out.append(a[0])))
    with torch.no_grad():
        for seq in seqs:
            model(input_ids=torch.tensor([seq]))
            rows.append(out.pop()[0, 1:].numpy())  # every non-BOS token
    handle.remove()
    x = np.concatenate(rows)
    assert len(x) == info["n_tokens"] == len(toks)
    dense = dense_codes(sae_dir, x).astype(np.float32).astype(np.float64)  # stored as float32
    stats = con.execute("SELECT feature_id, p95, mean, max, density, n_tokens, p95_all FROM v_feature_stats "
                        "WHERE layer = ? AND stream = ? ORDER BY feature_id", [layer, stream]).fetchall()
    d_sae = dense.shape[1]
    assert [s[0] for s in stats] == list(range(d_sae))  # every feature, never-active ones too
    got = np.array([s[1:5] for s in stats])
    # τ on both bases: the P95 of each feature's nonzero codes (active, default; 0 if it never fired),
    # and of its whole column, zeros included (all)
    active = np.array([np.percentile(c[c > 0], 95) if (c > 0).any() else 0.0 for c in dense.T])
    np.testing.assert_allclose(got[:, 0], active, rtol=1e-4, atol=1e-5)
    every = np.percentile(dense, 95, axis=0)
    np.testing.assert_allclose([s[6] for s in stats], every, rtol=1e-4, atol=1e-5)
    assert (active >= every).all() and (active > every).any()  # dropping the zeros raises the quantile
    np.testing.assert_allclose(got[:, 1], dense.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[:, 2], dense.max(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[:, 3], (dense > 0).mean(0), atol=2.0 / len(x))
    assert all(s[5] == len(x) for s in stats)


@pytest.mark.parametrize("score_mode", ["mean", "max", "mean×coverage", "selectivity"])
def test_run_scores_equal_numpy_recomputation(toy_demo, toy_discovery, score_mode):
    req = build_request({"model_id": "toy", "sae_id": "toy", "prompt": "Shares of ACME rose after EPS beat",
                         "gen_tokens": 24, "layers": [1], "streams": ["resid_pre"], "topk_tokens_per_seq": 16,
                         "return_top_x": 1000, "min_coverage_pct": 0, "score_mode": score_mode})
    result = toy_discovery.discover(req)
    con = toy_discovery.catalog.raw()
    toks = con.execute("SELECT position, token_id, kept FROM v_tokens WHERE run_id = ? ORDER BY position",
                       [result["run_id"]]).fetchall()
    ids = [t[1] for t in toks]
    kept = np.array([t[0] for t in toks if t[2]])
    assert len(kept) == 16 == result["analyzed"]["tokens"]
    x = hidden(toy_demo / "model", [ids], 1)[0][kept]
    dense = dense_codes(toy_demo / "saes" / "blocks.1.hook_resid_pre", x).astype(np.float32).astype(np.float64)
    stats = {r[0]: r[1:] for r in con.execute(
        "SELECT feature_id, p95, mean, max FROM v_feature_stats WHERE layer = 1 AND stream = 'resid_pre'").fetchall()}
    p95 = np.array([stats[f][0] for f in range(dense.shape[1])])
    bg = np.array([stats[f][1] for f in range(dense.shape[1])])
    cmax = np.array([stats[f][2] for f in range(dense.shape[1])])
    div = np.where(cmax > 0, cmax, 1.0)
    mean, mx, cov = dense.mean(0), dense.max(0), (dense > p95).mean(0)
    oracle = {"mean": mean / div, "max": mx / div, "mean×coverage": mean / div * cov, "selectivity": (mean - bg) / div}
    active = np.flatnonzero(mx > 0)
    assert {f["feature_id"] for f in result["features"]} == set(active.tolist())
    for f in result["features"]:
        i = f["feature_id"]
        assert f["scores"]["mean"] == pytest.approx(mean[i], rel=1e-4, abs=1e-6)
        assert f["scores"]["max"] == pytest.approx(mx[i], rel=1e-4, abs=1e-6)
        assert f["scores"]["coverage"] == pytest.approx(cov[i], abs=1e-9)
        assert f["scores"]["selectivity"] == pytest.approx(mean[i] - bg[i], rel=1e-4, abs=1e-6)
        assert f["score"] == pytest.approx(oracle[score_mode][i], rel=1e-4, abs=1e-6)
    expected_order = sorted(active, key=lambda i: -oracle[score_mode][i])
    got = [f["score"] for f in result["features"]]
    assert got == sorted(got, reverse=True)
    assert np.allclose(got, [oracle[score_mode][i] for i in expected_order], rtol=1e-4, atol=1e-6)


def test_second_request_never_loads_the_model(toy_registry, tmp_path):
    from catalog.db import Catalog
    from sae_discover.registry import Registry
    from sae_discover.service import Discovery

    path = tmp_path / "c.duckdb"
    body = {"model_id": "toy", "sae_id": "toy", "text": "Preheat the oven to 350 degrees.", "layers": [1]}
    cat = Catalog(path)
    first = Discovery(cat, Registry.load(toy_registry), device="cpu")
    a = first.discover(build_request(body))
    assert first.model_calls == 1 and not a["cached"]
    cat.close()
    cat = Catalog(path)
    fresh = Discovery(cat, Registry.load(toy_registry), device="cpu")  # a new process, in effect
    b = fresh.discover(build_request({**body, "score_mode": "max", "return_top_x": 3}))
    assert b["cached"] and b["run_id"] == a["run_id"]
    assert fresh.model_calls == 0 and fresh.loaded_models() == []  # the weights were never loaded
    assert len(b["features"]) <= 3
    cat.close()


def test_selectivity_against_a_background_text(toy_demo, toy_discovery):
    background = "The coach praised the defense and said the team played with energy."
    req = build_request({"model_id": "toy", "sae_id": "toy", "text": "Gross margin expanded 40 basis points.",
                         "layers": [1], "topk_tokens_per_seq": 1000, "return_top_x": 1000, "min_coverage_pct": 0,
                         "score_mode": "selectivity", "background_text": background})
    result = toy_discovery.discover(req)
    assert result["background"] == "text"
    tok = AutoTokenizer.from_pretrained(toy_demo / "model")
    sae_dir = toy_demo / "saes" / "blocks.1.hook_resid_pre"

    def dense_mean(text: str) -> np.ndarray:
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        x = hidden(toy_demo / "model", [ids], 1)[0][1:]  # every token but BOS
        return dense_codes(sae_dir, x).astype(np.float32).astype(np.float64).mean(0)

    mean, bg = dense_mean(req.text), dense_mean(background)
    cmax = dict(toy_discovery.catalog.raw().execute(
        "SELECT feature_id, max FROM v_feature_stats WHERE layer = 1 AND stream = 'resid_pre'").fetchall())
    assert result["features"]
    for f in result["features"]:
        i = f["feature_id"]
        assert f["scores"]["selectivity"] == pytest.approx(mean[i] - bg[i], rel=1e-4, abs=1e-6)
        assert f["score"] == pytest.approx((mean[i] - bg[i]) / (cmax[i] or 1.0), rel=1e-4, abs=1e-6)
    runs = toy_discovery.catalog.raw().execute("SELECT count(*) FROM v_runs").fetchone()[0]
    assert runs == 2  # the run and its background (kept, cached for the next request)
