"""Property tests: the SQL ranking equals a numpy oracle on the dense matrices, for every option."""

from __future__ import annotations

from dataclasses import replace

import duckdb
import numpy as np
import pyarrow as pa
import pytest
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


def calibration_rows(cal: list[np.ndarray]) -> tuple[pa.Table, pa.Table]:
    """The calibration tokens and activations batch of dense calibration codes (one per hook, rows the
    tokens): documents of CAL_DOC_LEN consecutive tokens, positions 1, 2, … over the whole corpus."""
    n = cal[0].shape[0]
    positions = np.arange(1, n + 1, dtype=np.int32)
    tokens = pa.table({"doc": pa.array((positions - 1) // CAL_DOC_LEN), "position": pa.array(positions),
                       "token_id": pa.array(np.zeros(n, np.int32)), "token": ["x"] * n})
    return tokens, sparse(cal, positions, {"doc": lambda t: ((t["position"] - 1) // CAL_DOC_LEN).astype(np.int32)})


def random_dense(rng, n, d, density):
    return np.where(rng.random((n, d)) < density, rng.random((n, d)) * 3, 0).astype(np.float32)


def calibrated_tau(c: np.ndarray, q: float, basis: str) -> np.ndarray:
    """τ per feature from the dense calibration codes: the q-quantile of each column's nonzero values
    (``active``; 0 for a feature that never fired) or of the whole column, zeros included (``all``)."""
    if basis == "all":
        return np.percentile(c, 100 * q, axis=0)
    return np.array([np.percentile(col[col > 0], 100 * q) if (col > 0).any() else 0.0 for col in c.T])


CAL_TOKENS, CAL_DOC_LEN = 25, 5  # the calibration of these tests: 5 documents of 5 tokens


def context_support(c: np.ndarray, lift: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Score mode ``context`` on dense matrices: each scored feature's Σ_g lift_g·max(0, r_fg) over the
    other scored features g, ÷ Σ lift over all scored ones, × min(1, its own lift); r the Pearson
    correlation, over the calibration documents (rows of ``c`` in consecutive blocks of CAL_DOC_LEN), of
    √ of the two features' activation mass per document (0 where a feature's √mass varies by less than
    10⁻³ of its root sum of squares across the documents: constant, no correlation is defined)."""
    x = np.sqrt(c.reshape(-1, CAL_DOC_LEN, c.shape[1]).sum(axis=1))  # [document, feature]
    centred = x - x.mean(0)
    spread = np.sqrt((centred ** 2).sum(0))
    defined = spread > 1e-3 * np.sqrt((x ** 2).sum(0))
    unit = np.divide(centred, spread, out=np.zeros_like(centred), where=defined)
    r = unit.T @ unit
    np.fill_diagonal(r, 0.0)
    w = np.where(scored, lift, 0.0)
    support = np.maximum(r, 0.0) @ w / w.sum() if w.sum() > 0 else 0.0
    return np.where(scored, support * np.minimum(1.0, lift), 0.0)


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
        fmax = np.where(cmax > 0, cmax, 1.0)  # lift's prior: a share of the feature's own calibration max
        if not calibrated or opts.normalization == "none":
            div = np.ones(d)
        elif opts.normalization == "sae_median_max":  # one scale per SAE: the median of the maxima that fired
            div = np.full(d, np.median(cmax[cmax > 0]) if (cmax > 0).any() else 1.0)
        else:
            div = fmax
        bg = c.mean(0) if calibrated else np.full(d, np.nan)
        mean, mx, cov = a.sum(0) / n, a.max(0), (a > tau).sum(0) / n
        used = attr[h].astype(np.float32).astype(np.float64).sum(0) if attr is not None else np.full(d, np.nan)
        lift = (mean + ranking.LIFT_PRIOR * fmax) / (bg + ranking.LIFT_PRIOR * fmax)
        scored = (mx > 0) & (cov * 100 >= opts.min_coverage_pct)
        if opts.restrict_features:
            scored &= np.isin(np.arange(d), opts.restrict_features)
        score = {"mean": mean / div, "max": mx / div, "mean×coverage": mean / div * cov,
                 "selectivity": (mean - bg) / div, "attribution": used, "attribution_abs": np.abs(used),
                 "lift": lift, "context": context_support(c, lift, scored) if opts.score_mode == "context" else None,
                 }[opts.score_mode]
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


def feature_scores(cat: Catalog, run_ids: list[str], opts: ranking.RankOptions,
                   background_runs: list[str] | None = None) -> list[dict]:
    """Every row of ``feature_scores`` for ``opts`` (and the run ids of stored background text), its
    options given as named macro arguments (as literal SQL, the way a user writes them), ordered by run
    and rank."""
    args = {"score_mode": opts.score_mode, "min_coverage_pct": opts.min_coverage_pct, "tau": opts.tau,
            "tau_quantile": opts.tau_quantile, "tau_basis": opts.tau_basis, "calibration_id": opts.calibration_id,
            "background": opts.background, "restrict_features": opts.restrict_features or None,
            "background_runs": background_runs}
    if opts.normalization != "calibration_max":  # (a catalog downgraded below 0012 has no such parameter)
        args["normalization"] = opts.normalization
    literal = ", ".join(f"{k} := {'NULL' if v is None else repr(v)}" for k, v in args.items())
    con = cat.raw()
    try:
        cur = con.execute(f"SELECT * FROM feature_scores({run_ids!r}, {literal}) ORDER BY run_id, rank")
        return [dict(zip([d[0] for d in cur.description], row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def assert_ranked_like(got: list[tuple], expected: list[tuple], score: dict) -> None:
    """``got`` and ``expected``: (layer, stream, feature_id) in rank order; ``score``: the oracle's score of
    every feature. The same features in the same order, except that two whose scores agree to float
    rounding may trade places: a tie (context gives one to two features linked only to each other, both
    below their usual level) comes out of SQL's and numpy's sums, added in other orders, an ulp apart."""
    assert len(got) == len(expected) and len(set(got)) == len(got)
    for g, e in zip(got, expected, strict=True):
        assert g == e or abs(score[g] - score[e]) <= 1e-12 + 1e-9 * abs(score[e]), (g, e, got, expected)


def assert_macro_equals_oracle(rows: list[dict], expected: list[tuple]) -> None:
    """``feature_scores`` rows of one run against the oracle's full merged ranking: the same features in
    the same order (``rank`` 1, 2, …; up to ties, :func:`assert_ranked_like`), the same values, and
    ``hook_rank`` the order within each hook."""
    by_key = {e[:3]: e for e in expected}
    assert_ranked_like([(r["layer"], r["stream"], r["feature_id"]) for r in rows], [e[:3] for e in expected],
                       {k: e[3] for k, e in by_key.items()})
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        e = by_key[r["layer"], r["stream"], r["feature_id"]]
        np.testing.assert_allclose([r["score"], r["mean"], r["max"], r["coverage"]], e[3:7], rtol=1e-9, atol=1e-12)
    for layer, stream in HOOKS:
        hook = [r for r in rows if (r["layer"], r["stream"]) == (layer, stream)]
        assert [r["hook_rank"] for r in hook] == list(range(1, len(hook) + 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), d=st.integers(1, 20), density=st.floats(0.05, 0.9),
       calibrated=st.booleans(), mode=st.sampled_from(ranking.SCORE_MODES), min_cov=st.sampled_from([0, 0.5, 10, 50]),
       top=st.integers(1, 12), merge=st.booleans(), tau_kind=st.sampled_from(["default", "global", "quantile"]),
       restrict=st.booleans(), basis=st.sampled_from(["active", "all"]), attributed=st.booleans(),
       normalization=st.sampled_from(ranking.NORMALIZATIONS))
def test_ranking_equals_the_numpy_oracle(tmp_path_factory, seed, n, d, density, calibrated, mode, min_cov, top,
                                         merge, tau_kind, restrict, basis, attributed, normalization):
    if mode in ranking.NEEDS_BACKGROUND and not calibrated:
        return  # refused with a message; tested below
    attributed = attributed or mode in ranking.ATTRIBUTION_MODES  # else refused; tested in test_attribution.py
    rng = np.random.default_rng(seed)
    run = [random_dense(rng, n, d, density) for _ in HOOKS]
    attr = [np.where(r > 0, rng.normal(size=r.shape), 0.0) for r in run] if attributed else None
    cal = [random_dense(rng, CAL_TOKENS, d, density) for _ in HOOKS] if calibrated else None
    opts = ranking.RankOptions(score_mode=mode, min_coverage_pct=min_cov, return_top_x=top, merge_across_layers=merge,
                               restrict_features=sorted(rng.choice(d, size=max(1, d // 2), replace=False).tolist())
                               if restrict else [],
                               tau=0.7 if tau_kind == "global" else None,
                               tau_quantile=0.8 if tau_kind == "quantile" else None, tau_basis=basis,
                               normalization=normalization, attach_examples=False, attach_proto_labels=False)
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
            cal_tokens, acts = calibration_rows(cal)
            stats.write_calibration(cat, MODEL, infos(d), "corpus", "h", CAL_TOKENS // CAL_DOC_LEN, cal_tokens, acts)
        con = cat.raw()
        keys = writes.sae_keys(con, infos(d))
        got = ranking.rank_run(cat, run_key, keys, opts)
        from_sql = feature_scores(cat, ["r"], opts)  # the public macro, called as a user would
    finally:
        cat.close()
    expected = oracle(run, cal, opts, attr)
    everything = oracle(run, cal, replace(opts, return_top_x=10**6, merge_across_layers=True), attr)
    assert_macro_equals_oracle(from_sql, everything)
    by_key = {r[:3]: r for r in everything}
    assert_ranked_like([(f["layer"], f["stream"], f["feature_id"]) for f in got["features"]], [r[:3] for r in expected],
                       {k: r[3] for k, r in by_key.items()})
    for f in got["features"]:
        r = by_key[f["layer"], f["stream"], f["feature_id"]]
        np.testing.assert_allclose([f["score"], f["mean"], f["max"], f["coverage"]], r[3:7], rtol=1e-9, atol=1e-12)
        if attributed:  # every returned feature carries its attribution, whatever the score mode
            assert f["attribution"] == np.float64(r[7]) or abs(f["attribution"] - r[7]) <= 1e-12 + 1e-9 * abs(r[7])
        else:
            assert f["attribution"] is None
    # invariants whatever the options: coverage is a fraction of the run's tokens, the mean at most the max
    assert all(0 <= f["coverage"] <= 1 and f["mean"] <= f["max"] + 1e-12 for f in got["features"])
    # attribution scores are raw (units of M), lift and context ratios; the activity modes' on the calibration's scale
    assert got["normalization"] == (normalization if calibrated and mode not in ("attribution", "attribution_abs", "lift",
                                                                                 "context") else "none")
    assert {r["normalization"] for r in from_sql} <= {got["normalization"]}
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
        ranking.rank_run(catalog, run_key, keys, ranking.RankOptions(score_mode="selectivity"))
    # context needs the calibration's documents whatever the background: both refusals say so first
    with pytest.raises(CatalogError, match="context weighs features by how they are active together"):
        ranking.rank_run(catalog, run_key, keys, ranking.RankOptions(score_mode="context"))
    for background in ("", ", background_runs := ['r']"):
        with pytest.raises(duckdb.InvalidInputException,
                           match=r"score_mode: context weighs features by how they are active together.*calibrate the SAE"):
            catalog.raw().execute(f"SELECT * FROM feature_scores(['r'], score_mode := 'context'{background})").fetchall()
    plain = ranking.rank_run(catalog, run_key, keys, ranking.RankOptions(score_mode="mean"))
    assert all(f["selectivity"] is None for f in plain["features"])
    assert plain["threshold_source"] == "none" and len(plain["features"]) == 6
    spans = plain["features"][0]["top_spans"]
    assert spans == [{"text": "bc", "position": [0, 3], "act": 1.0, "marked": "[[b]]c"}]  # BOS text left out, ±8 clipped


def _stored_run(catalog, run_id: str, model: writes.ModelInfo, dense: list[np.ndarray], d: int,
                attributed: bool = True) -> int:
    """A text run of ``len(dense[0])`` analysed tokens after a special token, with these dense codes per
    hook (the first ``len(dense)`` of HOOKS) and (``attributed``) signed attributions on its nonzero codes;
    returns its run key."""
    n = len(dense[0])
    tokens = pa.table({"position": pa.array(np.arange(n + 1, dtype=np.int32)),
                       "token_id": pa.array(np.arange(n + 1, dtype=np.int32)),
                       "token": [f" w{i}" for i in range(n + 1)], "is_generated": [False] * (n + 1),
                       "is_special": [i == 0 for i in range(n + 1)], "kept": [i > 0 for i in range(n + 1)],
                       "proxy": [0.0] * (n + 1)})
    meta = {"run_id": run_id, "model_id": model.model_id, "sae_id": "s", "mode": "text", "text": run_id,
            "generate": False, "n_tokens": n + 1, "n_kept": n}
    attr = [np.where(x > 0, np.linspace(-1, 1, x.size).reshape(x.shape), 0.0) for x in dense]
    key, _ = writes.write_run(catalog, meta, model, infos(d)[:len(dense)], tokens,
                              sparse(dense, np.arange(1, n + 1, dtype=np.int32), attr_by_hook=attr if attributed else None))
    return key


def test_ranking_several_runs_at_once_equals_ranking_each_alone(catalog):
    """Batch mode ranks a group of runs in one set of statements: every run's features, scores, spans
    and labels are exactly those of ranking it alone (both merge modes, runs of two models)."""
    rng = np.random.default_rng(7)
    other = writes.ModelInfo("m2", "fp2", "gpt2", 4, 8)
    runs = []
    for r in range(4):
        n = 3 + r
        dense = [random_dense(rng, n, 6, 0.5) for _ in HOOKS]
        key = _stored_run(catalog, f"r{r}", MODEL if r % 2 else other, dense, 6)
        runs.append(key)
    labels = pa.table({"feature_id": pa.array([0, 1, 2], pa.int32()), "label": ["zero", "one", "two"],
                       "source": ["csv"] * 3, "score": [0.9, 0.8, None]})
    write_labels(catalog, [(infos(6)[0], labels)])
    keys = writes.sae_keys(catalog.raw(), infos(6))
    for merge in (True, False):
        opts = ranking.RankOptions(merge_across_layers=merge, min_coverage_pct=0, return_top_x=4, span_window=1)
        together = ranking.rank_runs(catalog, runs, keys, opts)
        alone = [ranking.rank_run(catalog, key, keys, opts) for key in runs]
        assert together == alone
        assert all(0 < len(r["features"]) <= (4 if merge else 8) for r in together)
        assert any(f["proto_label"] == "zero" for r in together for f in r["features"])
        assert all(f["top_spans"] for r in together for f in r["features"])
        twice = ranking.rank_runs(catalog, [runs[0], runs[1], runs[0]], keys, opts)  # a run listed twice
        assert twice[0] == twice[2] == alone[0] and twice[1] == alone[1] and twice[0] is not twice[2]


def test_a_batch_background_is_the_other_runs_mean_leave_one_out(catalog):
    """``background: batch``: each run's background mean is the mean of every other run ranked with it
    (absent features 0, n weighted by each run's analysed tokens), for selectivity and lift, computed
    here on the dense matrices; a run ranked alone has no batch to contrast with and is refused."""
    import pytest

    from catalog.errors import CatalogError

    rng = np.random.default_rng(11)
    d, sizes, runs, dense_runs = 5, [3, 5, 4], [], []
    cal = [random_dense(rng, 20, d, 0.5) for _ in HOOKS]
    cal_tokens, acts = calibration_rows(cal)
    stats.write_calibration(catalog, MODEL, infos(d), "corpus", "h", 20 // CAL_DOC_LEN, cal_tokens, acts)
    for r, n in enumerate(sizes):
        dense = [random_dense(rng, n, d, 0.4) for _ in HOOKS]
        key = _stored_run(catalog, f"b{r}", MODEL, dense, d)
        runs.append(key)
        dense_runs.append(dense)
    keys = writes.sae_keys(catalog.raw(), infos(d))
    for mode in ("selectivity", "lift"):
        opts = ranking.RankOptions(score_mode=mode, background="batch", min_coverage_pct=0, return_top_x=100,
                                   attach_examples=False, attach_proto_labels=False)
        got = ranking.rank_runs(catalog, runs, keys, opts)
        for i, (result, n) in enumerate(zip(got, sizes, strict=True)):
            expected = {}
            for h, (layer, stream) in enumerate(HOOKS):
                others = [dense_runs[j][h].astype(np.float64) for j in range(len(runs)) if j != i]
                bg = sum(o.sum(0) for o in others) / sum(len(o) for o in others)
                mean = dense_runs[i][h].astype(np.float64).sum(0) / n
                cmax = cal[h].astype(np.float64).max(0)
                div = np.where(cmax > 0, cmax, 1.0)
                score = (mean - bg) / div if mode == "selectivity" else \
                    (mean + ranking.LIFT_PRIOR * div) / (bg + ranking.LIFT_PRIOR * div)
                expected.update({(layer, stream, f): (score[f], mean[f] - bg[f]) for f in range(d) if mean[f] > 0})
            assert {(f["layer"], f["stream"], f["feature_id"]) for f in result["features"]} == set(expected)
            for f in result["features"]:
                want_score, want_sel = expected[(f["layer"], f["stream"], f["feature_id"])]
                assert f["score"] == pytest.approx(want_score, rel=1e-5, abs=1e-6)
                assert f["selectivity"] == pytest.approx(want_sel, rel=1e-5, abs=1e-6)
        # the others as contrast only: the first run's ranking as above, the contrast runs' not returned
        with_spans = replace(opts, attach_examples=True, return_top_x=3)
        assert ranking.rank_runs(catalog, runs[:1], keys, with_spans, contrast=runs[1:]) == \
            ranking.rank_runs(catalog, runs, keys, with_spans)[:1]
        with pytest.raises(CatalogError, match="batch contrasts each run with the other runs"):
            ranking.rank_runs(catalog, runs[:1], keys, opts)
    with pytest.raises(CatalogError, match="background: expected one of calibration, batch"):
        ranking.rank_runs(catalog, runs, keys, ranking.RankOptions(background="neighbours"))


def _calibrate(catalog, model: writes.ModelInfo, rng, d: int) -> int:
    cal = [random_dense(rng, 30, d, 0.4) for _ in HOOKS]
    cal_tokens, acts = calibration_rows(cal)
    return stats.write_calibration(catalog, model, infos(d), "corpus", "h", 30 // CAL_DOC_LEN, cal_tokens, acts)


def test_the_macro_equals_the_service_ranking_for_every_option_set(catalog):
    """``feature_scores`` called as a user would (run ids, named arguments) returns exactly the service's
    ranking — features, order and values — for the option sets of the tests above and of the CLI, API and
    drift tests: every score mode, global τ and other quantiles on both bases, restrict sets, both merge
    modes, a pinned older calibration, stored background text and the batch background, over runs of a
    calibrated and an uncalibrated model (each run on its own model's calibration)."""
    import pytest

    from catalog.errors import CatalogError

    rng = np.random.default_rng(5)
    d, other = 10, writes.ModelInfo("m2", "fp2", "gpt2", 4, 8)
    first_cal = _calibrate(catalog, MODEL, rng, d)
    _calibrate(catalog, MODEL, rng, d)  # the newest: the default; the first is pinned below
    runs = {f"r{i}": _stored_run(catalog, f"r{i}", MODEL if i < 3 else other,
                                 [random_dense(rng, 4 + i, d, 0.5) for _ in HOOKS], d) for i in range(5)}
    background = _stored_run(catalog, "bg", MODEL, [random_dense(rng, 9, d, 0.5) for _ in HOOKS], d)
    keys = writes.sae_keys(catalog.raw(), infos(d))
    option_sets = [dict(score_mode=m) for m in ranking.SCORE_MODES] + [
        dict(tau=0.7), dict(tau_quantile=0.8), dict(tau_quantile=0.8, tau_basis="all"), dict(tau_basis="all"),
        dict(restrict_features=[1, 4, 7]), dict(merge_across_layers=False, return_top_x=3),
        dict(min_coverage_pct=10, return_top_x=5), dict(calibration_id=first_cal, score_mode="selectivity"),
        dict(background="batch", score_mode="lift"), dict(background="batch", score_mode="selectivity"),
        dict(background="batch", score_mode="context"), dict(score_mode="context", min_coverage_pct=10)]
    checked = 0
    for extra in option_sets:
        opts = ranking.RankOptions(**{"min_coverage_pct": 0, "return_top_x": 1000, "attach_examples": False,
                                      "attach_proto_labels": False, **extra})
        members = [name for name in runs if opts.calibration_id is None or name < "r3"]  # pinned: its model only
        with_bg = [replace(opts, background_runs=[background])] \
            if opts.score_mode == "selectivity" and opts.background == "calibration" else []
        for o in [opts, *with_bg]:
            needs = o.score_mode in ranking.NEEDS_CALIBRATION or (
                o.score_mode in ranking.NEEDS_BACKGROUND and not o.background_runs and o.background == "calibration")
            if needs and any(name >= "r3" for name in members):  # the uncalibrated model: refused by both
                refusal = "needs a background|active together in the calibration documents"
                with pytest.raises(CatalogError, match=refusal):
                    ranking.rank_runs(catalog, [runs[m] for m in members], keys, o)
                with pytest.raises(duckdb.InvalidInputException, match=rf"score_mode: .* ({refusal})"):
                    feature_scores(catalog, members, o)
                members_now = [m for m in members if m < "r3"]
            else:
                members_now = members
            service = ranking.rank_runs(catalog, [runs[m] for m in members_now], keys, o)
            rows = feature_scores(catalog, members_now, o, ["bg"] if o.background_runs else None)
            column = "rank" if o.merge_across_layers else "hook_rank"
            for name, result in zip(members_now, service, strict=True):
                mine = [r for r in rows if r["run_id"] == name and r[column] <= o.return_top_x]
                if not o.merge_across_layers:
                    mine.sort(key=lambda r: (r["layer"], r["stream"], r[column]))
                fields = ("layer", "stream", "feature_id", "score", "mean", "max", "coverage", "selectivity",
                          "attribution")
                assert [tuple(r[k] for k in fields) for r in mine] == \
                       [tuple(f[k] for k in fields) for f in result["features"]], (extra, name)
                assert {r["calibration_id"] for r in mine} <= set(result["calibrations"].values())
                assert {r["normalization"] for r in mine} <= {result["normalization"]}
                checked += len(mine)
    assert checked > 500


def test_the_stored_macros_are_the_ones_the_code_defines(catalog):
    """Migration texts are frozen: a freshly migrated catalog holds the macros of ``catalog.scoring``
    exactly (as DuckDB stores them). A change to the scoring rules fails here until a new migration
    recreates the macros with the new text."""
    from catalog.scoring import MACROS

    query = ("SELECT function_name, macro_definition, parameters FROM duckdb_functions() "
             "WHERE function_name IN ('scoring_hooks', 'scored_features', 'feature_scores') ORDER BY 1")
    con = catalog.raw()
    try:
        stored = con.execute(query).fetchall()
        for text in MACROS.values():
            con.execute(text)  # CREATE OR REPLACE: what the code defines now
        current = con.execute(query).fetchall()
    finally:
        con.close()
    assert len(stored) == 3 and stored == current, "catalog.scoring.MACROS changed: add a migration that recreates them"


SCORED_FEATURES_TEXT = "SELECT macro_definition FROM duckdb_functions() WHERE function_name = 'scored_features'"


def _texts_at(tmp_path, revision: str, query: str) -> list[tuple]:
    """The rows of ``query`` (macro texts) in a fresh catalog migrated only up to ``revision``: what a
    downgrade to it must restore."""
    from alembic import command

    from catalog.db import alembic_config

    path = tmp_path / f"only_{revision}.duckdb"
    command.upgrade(alembic_config(f"duckdb:///{path}"), revision)
    con = duckdb.connect(str(path))
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def test_migration_0006_shares_the_quantiles_and_its_downgrade_restores_0005(tmp_path):
    """0006 recreates ``scored_features`` with the quantile CTEs that write a calibration's P95s: the
    same scores for other quantiles on both bases as 0005's text; downgrading restores 0005's macro
    exactly (as a catalog migrated only to 0005 holds it), upgrading again the code's."""
    from alembic import command

    from catalog.db import alembic_config

    query = SCORED_FEATURES_TEXT
    [(text_0005,)] = _texts_at(tmp_path, "0005", query)

    path = tmp_path / "c.duckdb"
    cat = Catalog(path)
    rng = np.random.default_rng(3)
    _calibrate(cat, MODEL, rng, 8)
    _stored_run(cat, "r", MODEL, [random_dense(rng, 12, 8, 0.5) for _ in HOOKS], 8)
    option_sets = [ranking.RankOptions(tau_quantile=q, tau_basis=basis, min_coverage_pct=0)
                   for q in (0.3, 0.8, 0.95) for basis in ("active", "all")]
    at_head = [feature_scores(cat, ["r"], o) for o in option_sets]
    assert all(at_head)
    con = cat.raw()
    (text_head,) = con.execute(query).fetchone()
    con.close()
    cat.close()
    cfg = alembic_config(f"duckdb:///{path}")
    command.downgrade(cfg, "0005")
    old = Catalog(path, migrate=False)
    try:
        con = old.raw()
        assert con.execute(query).fetchone() == (text_0005,) and text_0005 != text_head
        con.close()
        assert [feature_scores(old, ["r"], o) for o in option_sets] == at_head
    finally:
        old.close()
    command.upgrade(cfg, "head")
    con = duckdb.connect(str(path))
    assert con.execute(query).fetchone() == (text_head,)
    con.close()


def test_migration_0012_adds_normalization_and_its_downgrade_restores_0011(tmp_path):
    """0012 recreates ``scored_features`` and ``feature_scores`` with ``normalization``: the default's
    scores are 0011's; downgrading restores both macros exactly as a catalog migrated only to 0011
    holds them (and the parameter is gone), upgrading again the code's."""
    from alembic import command

    from catalog.db import alembic_config

    query = ("SELECT function_name, macro_definition FROM duckdb_functions() "
             "WHERE function_name IN ('scored_features', 'feature_scores') ORDER BY 1")
    texts_0011 = _texts_at(tmp_path, "0011", query)

    path = tmp_path / "c.duckdb"
    cat = Catalog(path)
    rng = np.random.default_rng(5)
    _calibrate(cat, MODEL, rng, 8)
    _stored_run(cat, "r", MODEL, [random_dense(rng, 12, 8, 0.5) for _ in HOOKS], 8)
    option_sets = [ranking.RankOptions(score_mode=m, min_coverage_pct=0) for m in ("mean", "selectivity", "lift")]
    at_head = [feature_scores(cat, ["r"], o) for o in option_sets]
    by_sae = feature_scores(cat, ["r"], ranking.RankOptions(score_mode="mean", normalization="sae_median_max"))
    assert all(at_head) and {r["normalization"] for r in by_sae} == {"sae_median_max"}
    assert {r["normalization"] for r in at_head[2]} == {"none"}  # lift, a ratio, since 0013 (0011: the asked one)
    at_head[2] = [{**r, "normalization": "calibration_max"} for r in at_head[2]]
    cat.close()
    cfg = alembic_config(f"duckdb:///{path}")
    command.downgrade(cfg, "0011")
    old = Catalog(path, migrate=False)
    try:
        con = old.raw()
        assert con.execute(query).fetchall() == texts_0011
        con.close()
        assert [feature_scores(old, ["r"], o) for o in option_sets] == at_head
        with pytest.raises(duckdb.BinderException):
            feature_scores(old, ["r"], ranking.RankOptions(normalization="none"))
    finally:
        old.close()
    command.upgrade(cfg, "head")



def test_the_macro_refuses_what_it_cannot_score_and_0013s_downgrade_restores_0012(tmp_path):
    """Called directly (as a user's SQL does), ``feature_scores`` refuses, naming the argument, a
    coverage gate outside [0, 100] or NULL, a quantile outside [0, 1], a negative τ, a batch background
    with background runs or over a model's lone run, and an attribution mode over a run without
    attributions — also when the query selects no score (``count(*)``) — and accepts every bound
    itself. Downgrading to 0012 restores its text, under which the same calls ran (NULL scores or
    nothing), and upgrading again the code's."""
    from alembic import command

    from catalog.db import alembic_config

    path = tmp_path / "c.duckdb"
    cat = Catalog(path)
    rng = np.random.default_rng(13)
    _calibrate(cat, MODEL, rng, 6)
    for name in ("r0", "r1"):
        _stored_run(cat, name, MODEL, [random_dense(rng, 5, 6, 0.5) for _ in HOOKS], 6)
    _stored_run(cat, "plain", writes.ModelInfo("m2", "fp2", "gpt2", 4, 8),
                [random_dense(rng, 5, 6, 0.5) for _ in HOOKS], 6, attributed=False)
    refused = [
        ("['r0']", "min_coverage_pct := 150", r"min_coverage_pct: expected a number in \[0, 100\], got 150"),
        ("['r0']", "min_coverage_pct := -1", r"min_coverage_pct: expected a number in \[0, 100\], got -1"),
        ("['r0']", "min_coverage_pct := NULL", r"min_coverage_pct: expected a number in \[0, 100\], got NULL"),
        ("['r0']", "tau_quantile := 1.5", r"tau_quantile: expected a number in \[0, 1\] or NULL, got 1.5"),
        ("['r0']", "tau := -0.1", r"tau: expected a number >= 0 or NULL, got -0.1"),
        ("['r0']", "tau := 'nan'::DOUBLE", r"tau: expected a number >= 0 or NULL, got nan"),
        ("['r0']", "tau := 0.5, tau_quantile := 0.9", r"tau: give either tau or tau_quantile, not both"),
        ("['r0']", "score_mode := 'lift', background_runs := ['r1', 'typo0000']", r"background_runs: no run typo0000"),
        ("['r0', 'r1']", "background := 'batch', background_runs := ['plain']", r"background: .* not both"),
        ("['r0', 'plain']", "background := 'batch', score_mode := 'lift'",
         r"background: batch contrasts each run .* run (r0|plain) is the only one in run_ids with sae_key \d"),
        ("['r0', 'plain']", "score_mode := 'attribution_abs'", r"score_mode: run plain has no attributions"),
    ]
    accepted = [("['r0']", f"min_coverage_pct := {p}") for p in (0, 100)] + [
        ("['r0']", f"tau_quantile := {q}") for q in (0, 1)] + [
        ("['r0']", "tau := 0"), ("['r0', 'r1']", "background := 'batch', score_mode := 'lift'"),
        ("['r0', 'r1']", "score_mode := 'attribution'")]

    def count(runs: str, args: str) -> int:
        con = cat.raw()
        try:
            return con.execute(f"SELECT count(*) FROM feature_scores({runs}, {args})").fetchone()[0]
        finally:
            con.close()

    def scores(runs: str, args: str) -> list:
        con = cat.raw()
        try:
            return [s for (s,) in con.execute(f"SELECT score FROM feature_scores({runs}, {args})").fetchall()]
        finally:
            con.close()

    for runs, args, message in refused:
        for query in (count, scores):
            with pytest.raises(duckdb.InvalidInputException, match=message) as raised:
                query(runs, args)
        refusal = ranking.macro_refusal(raised.value)  # what the service says: the argument as the field
        assert refusal is not None and f"{refusal.field}: {refusal.message}" in str(raised.value), message
        assert refusal.field == message.split(":")[0]
    for runs, args in accepted:
        got = scores(runs, args)
        assert all(s is not None and np.isfinite(s) for s in got), (runs, args)
    assert scores("['r0']", "min_coverage_pct := 0") and not scores("['r0']", "min_coverage_pct := 100")
    # a batch background is per SAE: over the runs that have it (one_hook lacks the second hook's SAE)
    one_hook_dense = [random_dense(rng, 7, 6, 0.5)]
    _stored_run(cat, "one_hook", MODEL, one_hook_dense, 6)
    for keys in ("", ", sae_keys := [1, 2]"):  # (sae_keys pairs one_hook with key 2 too: it still lacks that SAE)
        with pytest.raises(duckdb.InvalidInputException, match="run r0 is the only one in run_ids with sae_key 2"):
            count("['r0', 'one_hook']", f"background := 'batch', score_mode := 'selectivity'{keys}")
    con = cat.raw()
    try:
        dense_r0 = {}
        for layer, f, act in con.execute("SELECT layer, feature_id, act FROM v_activations WHERE run_id = 'r0'").fetchall():
            dense_r0[(layer, f)] = dense_r0.get((layer, f), 0.0) + act
        rows = con.execute("SELECT layer, feature_id, mean, selectivity FROM feature_scores(['r0', 'one_hook'], "
                           "background := 'batch', score_mode := 'mean', min_coverage_pct := 0) "
                           "WHERE run_id = 'r0'").fetchall()
        with_keys = con.execute("SELECT layer, feature_id, mean, selectivity FROM feature_scores(['r0', 'one_hook'], "
                                "background := 'batch', score_mode := 'mean', min_coverage_pct := 0, "
                                "sae_keys := [1, 2]) WHERE run_id = 'r0'").fetchall()
        assert sorted(with_keys) == sorted(rows)  # the SAEs given (as drift gives them): the same background
    finally:
        con.close()
    first_layer = HOOKS[0][0]
    other = one_hook_dense[0].astype(np.float64).sum(0) / 7
    assert {(layer, f) for layer, f, _, _ in rows} == set(dense_r0)
    for layer, f, mean, selectivity in rows:
        assert mean == pytest.approx(dense_r0[(layer, f)] / 5, rel=1e-6)
        if layer == first_layer:  # against one_hook's tokens only
            assert selectivity == pytest.approx(mean - other[f], rel=1e-5, abs=1e-6)
        else:  # no other run with that SAE: no batch background (the activity modes still rank)
            assert selectivity is None
    at_head = scores("['r0', 'r1']", "score_mode := 'lift', min_coverage_pct := 0")
    cat.close()

    query = SCORED_FEATURES_TEXT
    [(text_0012,)] = _texts_at(tmp_path, "0012", query)
    cfg = alembic_config(f"duckdb:///{path}")
    command.downgrade(cfg, "0012")
    old = Catalog(path, migrate=False)
    try:
        con = old.raw()
        assert con.execute(query).fetchone() == (text_0012,)
        con.close()
        cat = old
        assert scores("['r0', 'r1']", "score_mode := 'lift', min_coverage_pct := 0") == at_head
        assert scores("['r0', 'plain']", "background := 'batch', score_mode := 'lift'").count(None) > 0
        assert count("['r0']", "min_coverage_pct := 150") == 0
    finally:
        old.close()
    command.upgrade(cfg, "head")
    con = duckdb.connect(str(path))
    assert con.execute(query).fetchone() != (text_0012,)
    con.close()

def test_context_ranks_the_features_that_fire_with_the_prompts_other_features(catalog):
    """A hand-made case of score mode ``context``: in calibration, features 0-2 fire together in the
    first topic's documents, 3-5 in the second's, 6 once in every document (generic) and 7 never. A prompt
    fires 0, 1 and 2 strongly and, once, 3 (a stray word of the other topic) strongly, 4 weakly (far
    below its usual level), 6 and 7. Context puts the first topic on top — 3 comes below them although
    it is lifted more than any of them, its only support being the weak 4 — 4's support from 3 is cut
    by its own lift below 1, and 6 and 7 get none; every value equals the formula computed by hand."""
    d, doc = 8, CAL_DOC_LEN
    cal = np.zeros((6 * doc, d), np.float32)
    for k in range(6):  # documents 0-2: the first topic, 3-5: the second
        rows = slice(k * doc, (k + 1) * doc)
        cal[rows, [0, 1, 2] if k < 3 else [3, 4, 5]] = 1.0
        cal[k * doc, 6] = 1.0
    cal[0, 2] = 0.0  # feature 2 misses nothing: it still fires in document 0's other tokens
    run = np.zeros((4, d), np.float32)
    run[:, 0], run[:2, 1], run[:3, 2] = 2.0, 2.0, 1.0
    run[0, 3], run[3, 4], run[1, 6], run[2, 7] = 20.0, 0.1, 1.0, 1.0
    tokens, acts = calibration_rows([cal, cal])
    stats.write_calibration(catalog, MODEL, infos(d), "corpus", "h", 6, tokens, acts)
    _stored_run(catalog, "r", MODEL, [run, run], d)
    opts = ranking.RankOptions(score_mode="context", min_coverage_pct=0, return_top_x=100)
    rows = [r for r in feature_scores(catalog, ["r"], opts) if r["layer"] == HOOKS[0][0]]
    by_feature = {r["feature_id"]: r["score"] for r in rows}
    # by hand: lift_f = (mean_f + ε·max_f) / (bg_f + ε·max_f), calibration max 1 (feature 7: none, 1);
    # r over 6 documents of x = √(mass per document), N = 6: features 0 and 1 have x = √5 in documents
    # 0-2 and 0 elsewhere, so r(0, 1) = 1, and so do 3 and 4 in documents 3-5; 2 has x = 2, √5, √5, 0, 0, 0:
    # N·Σx0·x2 − Σx0·Σx2 = 6(2√5 + 10) − 3√5(2 + 2√5) = 30 + 6√5, N·Σx0² − (Σx0)² = 90 − 45 = 45,
    # N·Σx2² − (Σx2)² = 84 − (2 + 2√5)² = 60 − 8√5; topics against each other: r < 0, no link; 6 has the
    # same mass in every document and 7 none: r undefined, 0. Score: support × min(1, own lift)
    r02 = (30 + 6 * np.sqrt(5)) / np.sqrt(45 * (60 - 8 * np.sqrt(5)))
    eps = ranking.LIFT_PRIOR
    cal_mean = cal.mean(0)
    mean = run.sum(0) / 4
    lift = (mean + eps) / (cal_mean + eps)
    total = lift[[0, 1, 2, 3, 4, 6, 7]].sum()
    expected = {0: (lift[1] + r02 * lift[2]) / total, 1: (lift[0] + r02 * lift[2]) / total,
                2: r02 * (lift[0] + lift[1]) / total, 3: lift[4] / total, 4: lift[3] / total * lift[4], 6: 0.0, 7: 0.0}
    assert 0.99 < r02 < 1
    assert set(by_feature) == set(expected)
    for f, value in expected.items():
        assert by_feature[f] == np.float64(value) or abs(by_feature[f] - value) <= 1e-9 * max(1, value), f
    assert [r["feature_id"] for r in rows][:5] == sorted(expected, key=lambda f: -expected[f])[:5]
    assert lift[3] > lift[[0, 1, 2]].max() and lift[4] < 0.1  # the stray feature is lifted most, ranks below the topic
    assert lift[3] / total > expected[2]  # without the cut, the weak 4 would rank above the whole topic


def test_context_treats_a_feature_of_nearly_constant_mass_as_constant(catalog):
    """Float noise is no correlation: feature 0 has the same mass in every calibration document up to
    float32 rounding (one token each, 1 ± a few ulps), feature 1 the same pattern 10⁵ times larger, so
    clearly varying. r(0, 1) from sums of such values has no correct digits; 0 counts as constant (no
    links, support 0), 1 is linked to 2 only — in the SQL and the oracle alike."""
    d = 3
    noise = np.array([1.0000019073486328, 1.0000019073486328, 1.0000014305114746, 0.9999977350234985,
                      1.000002384185791, 0.9999976754188538])
    cal = np.zeros((6 * CAL_DOC_LEN, d), np.float32)
    cal[::CAL_DOC_LEN, 0] = noise
    cal[::CAL_DOC_LEN, 1] = 1 + (noise - 1) * 1e5
    cal[1::CAL_DOC_LEN, 2] = 1 + (noise - 1) * 1e5
    run = np.full((4, d), 0.5, np.float32)
    tokens, acts = calibration_rows([cal, cal])
    stats.write_calibration(catalog, MODEL, infos(d), "corpus", "h", 6, tokens, acts)
    _stored_run(catalog, "r", MODEL, [run, run], d)
    opts = ranking.RankOptions(score_mode="context", min_coverage_pct=0, return_top_x=100)
    got = {r["feature_id"]: r["score"] for r in feature_scores(catalog, ["r"], opts) if r["layer"] == HOOKS[0][0]}
    c = cal.astype(np.float64)
    lift = (run.mean(0) + ranking.LIFT_PRIOR * c.max(0)) / (c.mean(0) + ranking.LIFT_PRIOR * c.max(0))
    expected = context_support(c, lift, np.ones(d, bool))
    assert expected[0] == 0 and expected[1] > 0 and expected[2] > 0
    np.testing.assert_allclose([got[f] for f in range(d)], expected, rtol=1e-9, atol=1e-12)


def test_context_over_several_runs_of_two_models_equals_the_oracle(catalog):
    """Score mode ``context`` over runs ranked together: runs of two models, each on its own model's
    newest calibration (a pinned older one too), against the calibration and the batch background (lift
    weights from the same model's other runs, leave-one-out), with a gate and a restrict set — every
    row's score equals :func:`context_support` on the dense matrices of its run and calibration."""
    rng = np.random.default_rng(23)
    d, other = 8, writes.ModelInfo("m2", "fp2", "gpt2", 4, 8)
    cals, cal_ids = {}, {}
    for model, version in [(MODEL, "old"), (MODEL, "new"), (other, "new")]:
        cal = [random_dense(rng, 6 * CAL_DOC_LEN, d, 0.3) for _ in HOOKS]
        tokens, acts = calibration_rows(cal)
        cal_ids[model.model_id, version] = stats.write_calibration(catalog, model, infos(d), "corpus", "h", 6,
                                                                   tokens, acts)
        cals[model.model_id, version] = cal
    runs = {f"r{i}": (MODEL if i % 2 else other, [random_dense(rng, 3 + i, d, 0.5) for _ in HOOKS]) for i in range(4)}
    for name, (model, dense) in runs.items():
        _stored_run(catalog, name, model, dense, d)
    checked = 0
    for background, pinned, min_cov, restrict in [("calibration", False, 0, []), ("batch", False, 20, [0, 2, 3, 5, 7]),
                                                  ("calibration", True, 0, [1, 2, 4, 6]), ("batch", True, 0, [])]:
        members = {name: run for name, run in runs.items() if not pinned or run[0] is MODEL}
        opts = ranking.RankOptions(score_mode="context", background=background, min_coverage_pct=min_cov,
                                   restrict_features=restrict,
                                   calibration_id=cal_ids[MODEL.model_id, "old"] if pinned else None)
        got = {(r["run_id"], r["layer"], r["feature_id"]): r["score"] for r in feature_scores(catalog, list(members), opts)}
        expected = {}
        for name, (model, dense) in members.items():
            cal = cals[MODEL.model_id, "old"] if pinned else cals[model.model_id, "new"]
            for h, (layer, _) in enumerate(HOOKS):
                a, c = dense[h].astype(np.float64), cal[h].astype(np.float64)
                tau = calibrated_tau(c, 0.95, "active")
                div = np.where(c.max(0) > 0, c.max(0), 1.0)
                mean, cov = a.sum(0) / len(a), (a > tau).sum(0) / len(a)
                if background == "batch":
                    others = [o[1][h].astype(np.float64) for k, o in members.items() if k != name and o[0] is model]
                    bg = sum(o.sum(0) for o in others) / sum(len(o) for o in others)
                else:
                    bg = c.mean(0)
                lift = (mean + ranking.LIFT_PRIOR * div) / (bg + ranking.LIFT_PRIOR * div)
                scored = (a.max(0) > 0) & (cov * 100 >= min_cov) & (np.isin(np.arange(d), restrict) if restrict else True)
                support = context_support(c, lift, scored)
                expected.update({(name, layer, int(f)): support[f] for f in np.nonzero(scored)[0]})
        assert set(got) == set(expected), (background, pinned)
        np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-9, atol=1e-12)
        checked += sum(v > 0 for v in expected.values())
    assert checked > 20  # supports that are not 0: the pairs active together were counted


def test_the_macro_refuses_each_bad_choice_by_its_name_whatever_is_selected(catalog):
    """An unknown or NULL score_mode, background, tau_basis or normalization is an error naming that
    argument, also when the query selects no column the choice feeds (count(*))."""
    rng = np.random.default_rng(9)
    _calibrate(catalog, MODEL, rng, 8)
    _stored_run(catalog, "r", MODEL, [random_dense(rng, 6, 8, 0.5) for _ in HOOKS], 8)
    con = catalog.raw()
    try:
        assert con.execute("SELECT count(*) FROM feature_scores(['r'], min_coverage_pct := 0)").fetchone()[0] > 0
        for name in ("score_mode", "background", "tau_basis", "normalization"):
            for value, shown in (("'bogus'", "bogus"), ("NULL", "NULL")):
                with pytest.raises(duckdb.InvalidInputException, match=rf"{name}: expected one of .*, got {shown}"):
                    con.execute(f"SELECT count(*) FROM feature_scores(['r'], {name} := {value})").fetchall()
    finally:
        con.close()
