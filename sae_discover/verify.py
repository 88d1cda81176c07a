"""Verification by ablation (``verify_top``): does the attribution estimate predict what removing a
feature really does to the attribution target M?

For the top N returned features, and for the top N by mean activation, the model is rerun on the stored
run with that one feature's contribution subtracted at the analysed tokens of its hook
(:func:`ingest.attribution.ablation_deltas`, N rows per forward pass); the measured ΔM sits beside each
feature's attribution, whose first-order prediction is ΔM ≈ −attribution.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from catalog.attribution import feature_codes, run_sequence
from catalog.db import Catalog
from catalog.ranking import RankOptions, rank_runs
from ingest.attribution import Ablation, ablation_deltas, resolve_metric
from ingest.models import LoadedModel
from sae_discover.plan import RunPlan


def correlations(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """Pearson and Spearman (Pearson of average ranks) of two samples; None with fewer than two
    points or no spread in either."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for value in np.unique(v):
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def verify(catalog: Catalog, loaded: LoadedModel, plan: RunPlan, run: dict, ranked: dict, sae_keys: list[int],
           opts: RankOptions) -> dict:
    """Measure ΔM for the top ``verify_top`` returned features and the top ones by mean activation; sets
    ``ablation_delta`` on the returned feature rows and returns the ``verification`` block."""
    n = plan.req.verify_top
    top = sorted(ranked["features"], key=lambda f: -f["score"])[:n]
    by_mean = rank_runs(catalog, [run["run_key"]], sae_keys, replace(
        opts, score_mode="mean", return_top_x=n, merge_across_layers=True, attach_examples=False,
        attach_proto_labels=False))[0]["features"]
    features = {(f["sae_key"], f["feature_id"]): f for f in [*by_mean, *top]}
    codes = feature_codes(catalog, run["run_key"], list(features))
    ids, n_prompt = run_sequence(catalog, run["run_key"])
    metric = resolve_metric(loaded.tokenizer, plan.req.attribution_target)
    assert metric is not None  # plan_run refuses verify_top without a target
    saes = {}
    for f in features.values():
        hook = (int(f["layer"]), f["stream"])
        if hook not in saes:
            saes[hook] = plan.source.load(*hook).to(loaded.device)
    ablations = [Ablation((int(f["layer"]), f["stream"]), saes[(int(f["layer"]), f["stream"])], int(f["feature_id"]),
                          *codes[key]) for key, f in features.items()]
    base, deltas = ablation_deltas(loaded, ids, n_prompt, metric, ablations)
    delta = dict(zip(features, deltas, strict=True))
    for f in top:
        f["ablation_delta"] = delta[(f["sae_key"], f["feature_id"])]
    predicted = np.array([-float(f["attribution"]) for f in top])
    measured = np.array([f["ablation_delta"] for f in top])
    pearson, spearman = correlations(predicted, measured)
    mean_abs = lambda rows: float(np.mean([abs(delta[(f["sae_key"], f["feature_id"])]) for f in rows])) if rows else 0.0  # noqa: E731
    return {"target": plan.req.attribution_target, "metric": base,
            "pairs": [{"feature_id": int(f["feature_id"]), "layer": int(f["layer"]), "stream": f["stream"],
                       "attribution": float(f["attribution"]), "ablation_delta": f["ablation_delta"]} for f in top],
            "pearson": pearson, "spearman": spearman, "mean_abs_delta": mean_abs(top),
            "mean_abs_delta_top_mean": mean_abs(by_mean)}
