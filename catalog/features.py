"""One feature across the whole catalog (``feature show``, ``GET /v1/features/...``): its labels, its
calibration statistics and histogram, its top contexts over the stored runs, the runs where it was
among the top features, and the tokens its decoder promotes and suppresses (from its lite label).

A feature is named as users name it: ``sae_id`` (as the catalog stores it), ``layer``, ``stream`` and
``feature_id``. The catalog may hold several SAEs under one such name (other weights, other
fingerprints); like the public views, this reads all of them.

*Top runs* (a cheap, honest definition, not the stored score): the runs where the feature's mean
activation over the run's kept tokens is among the :data:`TOP_RUN_RANK` highest of the features of
the same SAE in that run — ranking each run by its stored score would re-run the ranking per run.
"""

from __future__ import annotations

import duckdb

from catalog.db import Catalog
from catalog.errors import UnknownFeature, hooks_text
from catalog.ranking import calibration_info, marked, token_texts, word_window
from catalog.report import HIST_BINS, feature_labels, histograms, lite_parts
from catalog.stats import calibration_for

TOP_RUN_RANK = 10  # a run counts when the feature's mean is among its top 10 features of that SAE
CONTEXT_WINDOW = 8  # tokens each side of a context's peak (moved to word boundaries, as spans are)

TOP_CONTEXTS_SQL = """
    SELECT run_key, run_id, position, act, token, n_fired, rank FROM v_top_contexts
    WHERE sae_id = $sae_id AND layer = $layer AND stream = $stream AND feature_id = $fid
    ORDER BY rank LIMIT $limit"""

# per run holding the feature: each feature's total over the run (its mean × the run's kept tokens),
# ranked among the features of the same SAE in that run
TOP_RUNS_SQL = """
    WITH fired AS (
        SELECT DISTINCT run_key, sae_key FROM activations
        WHERE list_contains($keys, sae_key) AND feature_id = $fid
    ), totals AS (
        SELECT a.run_key, a.sae_key, a.feature_id, sum(a.act) AS total, max(a.act) AS max
        FROM activations a SEMI JOIN fired f ON f.run_key = a.run_key AND f.sae_key = a.sae_key
        GROUP BY ALL
    ), ranked AS (
        SELECT *, row_number() OVER (PARTITION BY run_key, sae_key ORDER BY total DESC, feature_id) AS rank
        FROM totals
    )
    SELECT v.run_id, k.rank, k.total / greatest(v.n_kept, 1) AS mean, k.max, v.tags,
           count(*) OVER () AS n_top_runs
    FROM ranked k JOIN v_runs v USING (run_key)
    WHERE k.feature_id = $fid AND k.rank <= $top
    ORDER BY k.rank, mean DESC, v.run_id
    LIMIT $limit"""


def sae_keys_for(con: duckdb.DuckDBPyConnection, sae_id: str, layer: int, stream: str, feature_id: int) -> list[int]:
    """The catalog keys of the SAEs named (sae_id, layer, stream), after checking that the feature id is
    within their width; :class:`UnknownFeature` naming the first field the catalog does not hold."""
    rows = con.execute("SELECT layer, stream, sae_key, d_sae FROM saes WHERE sae_id = ? ORDER BY sae_key",
                       [sae_id]).fetchall()
    if not rows:
        known = [r[0] for r in con.execute("SELECT DISTINCT sae_id FROM saes ORDER BY 1 LIMIT 20").fetchall()]
        raise UnknownFeature("sae_id", f"no SAE {sae_id!r} in the catalog (it holds: {', '.join(known) or 'none'})")
    if not any(r[0] == layer for r in rows):
        raise UnknownFeature("layer", f"the catalog holds no SAE {sae_id!r} at layer {layer} (its hooks: "
                                      f"{hooks_text((r[0], r[1]) for r in rows)})")
    hook = [r for r in rows if r[0] == layer and r[1] == stream]
    if not hook:
        raise UnknownFeature("stream", f"the catalog holds no SAE {sae_id!r} for layer {layer} {stream} (its hooks: "
                                       f"{hooks_text((r[0], r[1]) for r in rows)})")
    width = max(r[3] or 0 for r in hook)
    if width and not 0 <= feature_id < width:
        raise UnknownFeature("feature_id", f"expected a feature id in [0, {width - 1}] (the SAE of layer {layer} "
                                           f"{stream} has {width} features), got {feature_id}")
    return [int(r[2]) for r in hook]


def _lite(labels: list[dict], calibration: dict | None) -> dict | None:
    """The parts of the lite label made with the calibration shown (the newest; any other lite label
    when that one has none): the tokens the feature fires on, those its decoder promotes and suppresses."""
    lite = [x for x in labels if x["source"] == "lite"]
    shown = calibration["calibration_id"] if calibration else None
    chosen = next((x for x in lite if x["calibration_id"] == shown), lite[0] if lite else None)
    return None if chosen is None else lite_parts(chosen["label"])


def _calibration(con: duckdb.DuckDBPyConnection, keys: list[int], feature_id: int, model_id: str | None = None
                 ) -> dict | None:
    """The feature's statistics and histogram in the newest calibration of its SAE (by any model, or by
    ``model_id``: a fine-tune's calibration need not be the one shown), with that calibration's corpus
    and model; ``buckets`` are the histogram's bins over (0, max], zeros counted apart."""
    calibrations = {key: calibration_for(con, key, model_id=model_id) for key in keys}
    if model_id is not None and all(cal is None for cal in calibrations.values()):
        raise UnknownFeature("model_id", f"no calibration of {model_id!r} holds statistics for this SAE")
    found = [h for key, cal in calibrations.items() if (h := histograms(con, cal, key, [feature_id]).get(feature_id))]
    if not found:
        return None
    hist = max(found, key=lambda h: h["calibration_id"])
    info = calibration_info(con, {0: hist["calibration_id"]}) or {}
    (model_id,) = con.execute("SELECT m.model_id FROM calibrations c JOIN models m USING (model_key) "
                              "WHERE c.calibration_id = ?", [hist["calibration_id"]]).fetchone()
    width = hist["max"] / HIST_BINS
    buckets = [{"lo": i * width, "hi": (i + 1) * width, "count": n} for i, n in enumerate(hist["counts"])]
    return {**info, "model_id": model_id, **{k: hist[k] for k in ("density", "mean", "max", "p95", "p95_all", "zeros")},
            "buckets": buckets}


def _contexts(con: duckdb.DuckDBPyConnection, sae_id: str, layer: int, stream: str, feature_id: int,
              limit: int, window: int) -> list[dict]:
    """The feature's top contexts (``v_top_contexts``: its peak in each run, highest first), each as an
    evidence span of ±window tokens with the peak marked, and the run's tags."""
    rows = con.execute(TOP_CONTEXTS_SQL, {"sae_id": sae_id, "layer": layer, "stream": stream, "fid": feature_id,
                                          "limit": limit}).fetchall()
    run_keys = sorted({int(r[0]) for r in rows})
    texts = token_texts(con, run_keys)
    tags = dict(con.execute("SELECT run_key, tags FROM v_runs WHERE list_contains(?, run_key)",
                            [run_keys]).fetchall()) if run_keys else {}
    out = []
    for run_key, run_id, position, act, token, n_fired, rank in rows:
        text = texts.get(run_key, [])
        start, end = word_window(text, position, window)
        out.append({"rank": int(rank), "run_id": run_id, "token": token, "n_fired": int(n_fired),
                    **marked(text, position, start, end, act), "peak": int(position),
                    "tags": dict(tags.get(run_key) or {})})
    return out


def _top_runs(con: duckdb.DuckDBPyConnection, keys: list[int], feature_id: int, limit: int) -> tuple[list[dict], int]:
    rows = con.execute(TOP_RUNS_SQL, {"keys": keys, "fid": feature_id, "top": TOP_RUN_RANK, "limit": limit}).fetchall()
    runs = [{"run_id": run_id, "rank": int(rank), "mean": float(mean), "max": float(mx), "tags": dict(tags or {})}
            for run_id, rank, mean, mx, tags, _ in rows]
    return runs, int(rows[0][-1]) if rows else 0


def feature_view(catalog: Catalog, sae_id: str, layer: int, stream: str, feature_id: int, limit: int = 10,
                 window: int = CONTEXT_WINDOW, model_id: str | None = None) -> dict:
    """Everything the catalog knows about one feature (module docstring); ``limit`` caps the contexts
    and the top runs listed (``n_top_runs`` counts them all); ``model_id`` picks whose calibration
    gives its statistics (default: the newest, by any model)."""
    con = catalog.raw()
    try:
        keys = sae_keys_for(con, sae_id, layer, stream, feature_id)
        (n_runs,) = con.execute("SELECT count(DISTINCT run_key) FROM activations WHERE list_contains(?, sae_key) "
                                "AND feature_id = ?", [keys, feature_id]).fetchone()
        labels = [label for found in feature_labels(con, [(k, feature_id) for k in keys]).values() for label in found]
        calibration = _calibration(con, keys, feature_id, model_id)
        contexts = _contexts(con, sae_id, layer, stream, feature_id, limit, window)
        top_runs, n_top_runs = _top_runs(con, keys, feature_id, limit)
    finally:
        con.close()
    lite = _lite(labels, calibration)
    return {"sae_id": sae_id, "layer": layer, "stream": stream, "feature_id": feature_id, "labels": labels,
            "calibration": calibration, "n_runs": int(n_runs), "top_contexts": contexts,
            "top_runs": top_runs, "n_top_runs": n_top_runs, "top_run_rank": TOP_RUN_RANK,
            "fires_on": None if lite is None else lite.get("fires on", []),
            "promotes": None if lite is None else lite.get("promotes", []),
            "suppresses": None if lite is None else lite.get("suppresses", [])}
