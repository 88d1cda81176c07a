"""Property tests: the SQL ranking equals a numpy oracle on the dense matrices, for every option."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import ranking, stats, writes
from catalog.db import Catalog
from catalog.labels import write_labels

MODEL = writes.ModelInfo("m", "fp", "gpt2", 4, 8)
HOOKS = [(1, "resid_pre"), (3, "mlp_out")]


def infos(d: int) -> list[writes.SAEInfo]:
    return [writes.SAEInfo("s", layer, stream, f"fp{layer}", f"blocks.{layer}.hook_{stream}", "standard", 8, d)
            for layer, stream in HOOKS]


def sparse(dense_by_hook: list[np.ndarray], positions: np.ndarray, extra: dict | None = None,
           attr_by_hook: list[np.ndarray] | None = None) -> pa.Table:
    """The nonzeros of dense codes as an activations batch (with ``attr`` at the same entries when given)."""
    cols: dict[str, list] = {"position": [], "sae_index": [], "feature_id": [], "act": []}
    if attr_by_hook is not None:
        cols["attr"] = []
    for i, dense in enumerate(dense_by_hook):
        r, c = np.nonzero(dense)
        cols["position"].append(positions[r])
        cols["sae_index"].append(np.full(len(r), i, np.int16))
        cols["feature_id"].append(c.astype(np.int32))
        cols["act"].append(dense[r, c].astype(np.float32))
        if attr_by_hook is not None:
            cols["attr"].append(attr_by_hook[i][r, c].astype(np.float32))
    table = {k: np.concatenate(v) for k, v in cols.items()}
    if extra:
        table = {**{k: v(table) for k, v in extra.items()}, **table}
    return pa.table(table)


def random_dense(rng, n, d, density):
    return np.where(rng.random((n, d)) < density, rng.random((n, d)) * 3, 0).astype(np.float32)


def calibrated_tau(c: np.ndarray, q: float, basis: str) -> np.ndarray:
    """τ per feature from the dense calibration codes: the q-quantile of each column's nonzero values
    (``active``; 0 for a feature that never fired) or of the whole column, zeros included (``all``)."""
    if basis == "all":
        return np.percentile(c, 100 * q, axis=0)
    return np.array([np.percentile(col[col > 0], 100 * q) if (col > 0).any() else 0.0 for col in c.T])


def oracle(run, cal, opts: ranking.RankOptions, attr=None):
    """The ranking rules of catalog/ranking.py, on dense matrices (``attr``: the attributions, dense,
    nonzero only where the codes are)."""
    rows = []
    calibrated = cal is not None
    for h, (layer, stream) in enumerate(HOOKS):
        a = run[h].astype(np.float64)
        n, d = a.shape
        c = cal[h].astype(np.float64) if calibrated else None
        if opts.tau is not None:
            tau = np.full(d, opts.tau)
        elif calibrated:
            tau = calibrated_tau(c, opts.tau_quantile if opts.tau_quantile is not None else 0.95, opts.tau_basis)
        else:
            tau = np.zeros(d)
        cmax = c.max(0) if calibrated else np.ones(d)
        div = np.where(cmax > 0, cmax, 1.0)
        bg = c.mean(0) if calibrated else np.full(d, np.nan)
        mean, mx, cov = a.sum(0) / n, a.max(0), (a > tau).sum(0) / n
        used = attr[h].astype(np.float32).astype(np.float64).sum(0) if attr is not None else np.full(d, np.nan)
        score = {"mean": mean / div, "max": mx / div, "mean×coverage": mean / div * cov,
                 "selectivity": (mean - bg) / div, "attribution": used, "attribution_abs": np.abs(used),
                 "lift": (mean + ranking.LIFT_PRIOR * div) / (bg + ranking.LIFT_PRIOR * div)}[opts.score_mode]
        for f in range(d):
            if mx[f] <= 0 or (opts.restrict_features and f not in opts.restrict_features):
                continue
            if cov[f] * 100 < opts.min_coverage_pct:
                continue
            rows.append((layer, stream, f, score[f], mean[f], mx[f], cov[f], used[f]))
    if opts.merge_across_layers:
        rows.sort(key=lambda r: (-r[3], r[0], r[1], r[2]))
        return rows[: opts.return_top_x]
    out = []
    for layer, stream in HOOKS:
        group = sorted((r for r in rows if (r[0], r[1]) == (layer, stream)), key=lambda r: (-r[3], r[2]))
        out += group[: opts.return_top_x]
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), d=st.integers(1, 20), density=st.floats(0.05, 0.9),
       calibrated=st.booleans(), mode=st.sampled_from(ranking.SCORE_MODES), min_cov=st.sampled_from([0, 0.5, 10, 50]),
       top=st.integers(1, 12), merge=st.booleans(), tau_kind=st.sampled_from(["default", "global", "quantile"]),
       restrict=st.booleans(), basis=st.sampled_from(["active", "all"]), attributed=st.booleans())
def test_ranking_equals_the_numpy_oracle(tmp_path_factory, seed, n, d, density, calibrated, mode, min_cov, top,
                                         merge, tau_kind, restrict, basis, attributed):
    if mode in ("selectivity", "lift") and not calibrated:
        return  # refused with a message; tested below
    attributed = attributed or mode in ranking.ATTRIBUTION_MODES  # else refused; tested in test_attribution.py
    rng = np.random.default_rng(seed)
    run = [random_dense(rng, n, d, density) for _ in HOOKS]
    attr = [np.where(r > 0, rng.normal(size=r.shape), 0.0) for r in run] if attributed else None
    cal = [random_dense(rng, 25, d, density) for _ in HOOKS] if calibrated else None
    opts = ranking.RankOptions(score_mode=mode, min_coverage_pct=min_cov, return_top_x=top, merge_across_layers=merge,
                               restrict_features=sorted(rng.choice(d, size=max(1, d // 2), replace=False).tolist())
                               if restrict else [],
                               tau=0.7 if tau_kind == "global" else None,
                               tau_quantile=0.8 if tau_kind == "quantile" else None, tau_basis=basis,
                               attach_examples=False, attach_proto_labels=False)
    cat = Catalog(tmp_path_factory.mktemp("rank") / "c.duckdb")
    try:
        positions = np.arange(1, n + 1, dtype=np.int32)
        tokens = pa.table({"position": pa.array(np.arange(n + 1, dtype=np.int32)),
                           "token_id": pa.array(np.arange(n + 1, dtype=np.int32)),
                           "token": [f"t{i}" for i in range(n + 1)], "is_generated": [False] * (n + 1),
                           "is_special": [i == 0 for i in range(n + 1)], "kept": [i > 0 for i in range(n + 1)],
                           "proxy": [0.0] * (n + 1)})
        run_meta = {"run_id": "r", "model_id": "m", "sae_id": "s", "mode": "text", "text": "x", "generate": False,
                    "n_tokens": n + 1, "n_kept": n}
        run_key, _ = writes.write_run(cat, run_meta, MODEL, infos(d), tokens, sparse(run, positions, attr_by_hook=attr))
        if calibrated:
            cal_tokens = pa.table({"doc": pa.array(np.zeros(25, np.int32)),
                                   "position": pa.array(np.arange(1, 26, dtype=np.int32)),
                                   "token_id": pa.array(np.zeros(25, np.int32)), "token": ["x"] * 25})
            acts = sparse(cal, np.arange(1, 26, dtype=np.int32), {"doc": lambda t: np.zeros(len(t["act"]), np.int32)})
            stats.write_calibration(cat, MODEL, infos(d), "corpus", "h", 1, cal_tokens, acts)
        con = cat.raw()
        keys = writes.sae_keys(con, infos(d))
        got = ranking.rank_run(cat, run_key, n, keys, opts)
    finally:
        cat.close()
    expected = oracle(run, cal, opts, attr)
    assert [(f["layer"], f["stream"], f["feature_id"]) for f in got["features"]] == [r[:3] for r in expected]
    for f, r in zip(got["features"], expected, strict=True):
        np.testing.assert_allclose([f["score"], f["mean"], f["max"], f["coverage"]], r[3:7], rtol=1e-9, atol=1e-12)
        if attributed:  # every returned feature carries its attribution, whatever the score mode
            assert f["attribution"] == np.float64(r[7]) or abs(f["attribution"] - r[7]) <= 1e-12 + 1e-9 * abs(r[7])
        else:
            assert f["attribution"] is None
    # invariants whatever the options: coverage is a fraction of the run's tokens, the mean at most the max
    assert all(0 <= f["coverage"] <= 1 and f["mean"] <= f["max"] + 1e-12 for f in got["features"])
    assert got["normalization"] == ("calibration_max" if calibrated else "none")
    suffix = "" if basis == "active" else "_all"  # the default basis keeps the plain name
    assert got["threshold_source"] == {"global": "global",
                                       "default": f"calibration_p95{suffix}" if calibrated else "none",
                                       "quantile": f"calibration_q0.8{suffix}" if calibrated else "none"}[tau_kind]


def test_selectivity_without_a_background_is_refused_with_advice(catalog):
    import pytest

    from catalog.errors import CatalogError

    run = [np.ones((2, 3), np.float32) for _ in HOOKS]
    tokens = pa.table({"position": pa.array([0, 1, 2], pa.int32()), "token_id": pa.array([0, 1, 2], pa.int32()),
                       "token": ["a", "b", "c"], "is_generated": [False] * 3, "is_special": [True, False, False],
                       "kept": [False, True, True], "proxy": [0.0] * 3})
    meta = {"run_id": "r", "model_id": "m", "sae_id": "s", "mode": "text", "text": "x", "generate": False,
            "n_tokens": 3, "n_kept": 2}
    run_key, _ = writes.write_run(catalog, meta, MODEL, infos(3), tokens, sparse(run, np.array([1, 2], np.int32)))
    keys = writes.sae_keys(catalog.raw(), infos(3))
    with pytest.raises(CatalogError, match="selectivity needs a background; calibrate"):
        ranking.rank_run(catalog, run_key, 2, keys, ranking.RankOptions(score_mode="selectivity"))
    plain = ranking.rank_run(catalog, run_key, 2, keys, ranking.RankOptions(score_mode="mean"))
    assert all(f["selectivity"] is None for f in plain["features"])
    assert plain["threshold_source"] == "none" and len(plain["features"]) == 6
    spans = plain["features"][0]["top_spans"]
    assert spans == [{"text": "bc", "position": [0, 3], "act": 1.0, "marked": "[[b]]c"}]  # BOS text left out, ±8 clipped


def test_ranking_several_runs_at_once_equals_ranking_each_alone(catalog):
    """Batch mode ranks a group of runs in one set of statements: every run's features, scores, spans
    and labels are exactly those of ranking it alone (both merge modes, runs of two models)."""
    rng = np.random.default_rng(7)
    other = writes.ModelInfo("m2", "fp2", "gpt2", 4, 8)
    runs = []
    for r in range(4):
        n = 3 + r
        dense = [random_dense(rng, n, 6, 0.5) for _ in HOOKS]
        tokens = pa.table({"position": pa.array(np.arange(n + 1, dtype=np.int32)),
                           "token_id": pa.array(np.arange(n + 1, dtype=np.int32)),
                           "token": [f" w{r}{i}" for i in range(n + 1)], "is_generated": [False] * (n + 1),
                           "is_special": [i == 0 for i in range(n + 1)], "kept": [i > 0 for i in range(n + 1)],
                           "proxy": [0.0] * (n + 1)})
        meta = {"run_id": f"r{r}", "model_id": "m", "sae_id": "s", "mode": "text", "text": "x", "generate": False,
                "n_tokens": n + 1, "n_kept": n}
        key, _ = writes.write_run(catalog, meta, MODEL if r % 2 else other, infos(6), tokens,
                                 sparse(dense, np.arange(1, n + 1, dtype=np.int32)))
        runs.append((key, n))
    labels = pa.table({"feature_id": pa.array([0, 1, 2], pa.int32()), "label": ["zero", "one", "two"],
                       "source": ["csv"] * 3, "score": [0.9, 0.8, None]})
    write_labels(catalog, [(infos(6)[0], labels)])
    keys = writes.sae_keys(catalog.raw(), infos(6))
    for merge in (True, False):
        opts = ranking.RankOptions(merge_across_layers=merge, min_coverage_pct=0, return_top_x=4, span_window=1)
        together = ranking.rank_runs(catalog, runs, keys, opts)
        alone = [ranking.rank_run(catalog, key, n, keys, opts) for key, n in runs]
        assert together == alone
        assert all(0 < len(r["features"]) <= (4 if merge else 8) for r in together)
        assert any(f["proto_label"] == "zero" for r in together for f in r["features"])
        assert all(f["top_spans"] for r in together for f in r["features"])
        twice = ranking.rank_runs(catalog, [runs[0], runs[1], runs[0]], keys, opts)  # a run listed twice
        assert twice[0] == twice[2] == alone[0] and twice[1] == alone[1] and twice[0] is not twice[2]
