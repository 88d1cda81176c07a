"""What an HTML report of a stored run shows beyond its ranked features — all read from the catalog, so a
report never needs the model: the run's tokens (generated / special / kept flags), the per-token
activations of the features it shows, each feature's calibration histogram and statistics, and every
stored label of each feature (the lite label's decoder tokens split out).

Features are named as the response names them, ``(layer, stream, feature_id)``; the run's SAEs map
each (layer, stream) to its catalog key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import duckdb

from catalog.db import Catalog
from catalog.runs import run_saes
from catalog.stats import calibration_for

Feature = tuple[int, str, int]  # layer, stream, feature_id
HIST_BINS = 24  # bins of a calibration histogram, over (0, the feature's calibration max]

HISTOGRAM_SQL = """
    WITH stats AS (
        SELECT feature_id, max AS hi, p95, p95_all, mean, density, n_tokens FROM feature_stats
        WHERE calibration_id = $cal AND sae_key = $sae AND list_contains($features, feature_id)
    ), binned AS (
        SELECT a.feature_id, least(floor(a.act / s.hi * $bins), $bins - 1)::INTEGER AS bin, count(*) AS n
        FROM calibration_activations a JOIN stats s USING (feature_id)
        WHERE a.calibration_id = $cal AND a.sae_key = $sae AND a.act > 0 AND s.hi > 0
        GROUP BY ALL
    )
    SELECT s.feature_id, s.hi, s.p95, s.p95_all, s.mean, s.density, s.n_tokens,
           coalesce(list(b.bin ORDER BY b.bin) FILTER (WHERE b.bin IS NOT NULL), []) AS bins,
           coalesce(list(b.n ORDER BY b.bin) FILTER (WHERE b.bin IS NOT NULL), []) AS counts
    FROM stats s LEFT JOIN binned b USING (feature_id)
    GROUP BY ALL
"""


# the (sae_key, feature_id) pairs a report shows, as a relation (two parameters: :func:`_wanted`)
WANTED = "(SELECT unnest(?::INTEGER[]) AS sae_key, unnest(?::INTEGER[]) AS feature_id)"


def _wanted(keys: Sequence[tuple[int, int]]) -> list[list[int]]:
    return [[k for k, _ in keys], [f for _, f in keys]]


def _has_column(con: duckdb.DuckDBPyConnection, table: str, column: str) -> bool:
    """Whether a catalog table has a column (an optional one a later revision adds, e.g. attribution)."""
    return bool(con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?",
                            [table, column]).fetchone()[0])


def run_tokens(con: duckdb.DuckDBPyConnection, run_key: int) -> list[dict]:
    rows = con.execute("SELECT position, token_id, coalesce(token, ''), is_generated, is_special, kept FROM tokens "
                       "WHERE run_key = ? ORDER BY position", [run_key]).fetchall()
    return [{"position": int(p), "token_id": int(t), "token": s, "generated": bool(g), "special": bool(sp),
             "kept": bool(k)} for p, t, s, g, sp, k in rows]


def feature_activations(con: duckdb.DuckDBPyConnection, run_key: int, keys: Sequence[tuple[int, int]]
                        ) -> dict[tuple[int, int], dict]:
    """Per (sae_key, feature_id): the positions where it is nonzero in the run, its activations there, and
    its attributions when the catalog stores them (an ``attr`` column), in position order."""
    if not keys:
        return {}
    attr = "list(attr ORDER BY position)" if _has_column(con, "activations", "attr") else "NULL"
    rows = con.execute(
        f"SELECT sae_key, feature_id, list(position ORDER BY position), list(act ORDER BY position), {attr} "
        f"FROM activations JOIN {WANTED} USING (sae_key, feature_id) WHERE run_key = ? GROUP BY sae_key, feature_id",
        [*_wanted(keys), run_key]).fetchall()
    return {(int(k), int(f)): {"positions": list(p), "acts": [float(a) for a in acts],
                               "attr": None if at is None or all(x is None for x in at)  # a run made without it
                               else [None if x is None else float(x) for x in at]}
            for k, f, p, acts, at in rows}


def histograms(con: duckdb.DuckDBPyConnection, cal: int | None, sae_key: int, features: Sequence[int],
               bins: int = HIST_BINS) -> dict[int, dict]:
    """Per feature of one SAE: the histogram of its nonzero activations over the corpus of calibration
    ``cal`` (``bins`` equal bins over (0, max]), the zeros counted apart, and the calibration's p95 (τ),
    p95_all, mean, max and density. Empty without a calibration (``cal`` None)."""
    if cal is None or not features:
        return {}
    out = {}
    for f, hi, p95, p95_all, mean, density, n, where, counts in con.execute(
            HISTOGRAM_SQL, {"cal": cal, "sae": sae_key, "features": list(features), "bins": bins}).fetchall():
        dense = [0] * bins
        for b, c in zip(where, counts, strict=True):
            dense[b] = int(c)
        out[int(f)] = {"calibration_id": cal, "max": float(hi), "p95": float(p95), "p95_all": float(p95_all),
                       "mean": float(mean),
                       "density": float(density), "n_tokens": int(n), "zeros": int(n) - sum(dense), "counts": dense}
    return out


LITE_VERBS = ("fires on", "promotes", "suppresses")


def lite_parts(label: str) -> dict[str, list[str]]:
    """The token lists of a lite label as ``catalog.stats.write_lite_labels`` writes it
    (``fires on "a", "b"; promotes "c"; suppresses "d"``): verb → tokens. Read left to right, part by
    part, so a token whose text contains a verb (``" promotes"``) is a token, never a part's start."""
    out: dict[str, list[str]] = {}
    decoder = json.JSONDecoder()
    i = 0
    while (verb := next((v for v in LITE_VERBS if label.startswith(v + " ", i)), None)) is not None:
        i += len(verb) + 1
        tokens = out.setdefault(verb, [])
        while label.startswith('"', i):
            try:
                token, i = decoder.raw_decode(label, i)
            except ValueError:
                return out
            tokens.append(token)
            i += 2 if label.startswith(', "', i) else 0
        if not label.startswith("; ", i):
            break
        i += 2
    return out


def feature_labels(con: duckdb.DuckDBPyConnection, keys: Sequence[tuple[int, int]],
                   cals: Mapping[int, int | None] | None = None) -> dict[tuple[int, int], list[dict]]:
    """Every stored label of each (sae_key, feature_id), newest first, with the calibration a lite label
    was made from (``calibration_id``; None for imported labels). ``cals`` (sae_key → calibration):
    only that calibration's lite labels (a run's report shows its own model's)."""
    if not keys:
        return {}
    out: dict[tuple[int, int], list[dict]] = {}
    for k, f, label, source, score, cal in con.execute(
            f"SELECT sae_key, feature_id, label, source, score, calibration_id FROM labels "
            f"JOIN {WANTED} USING (sae_key, feature_id) "
            "ORDER BY sae_key, feature_id, created_at DESC, calibration_id DESC NULLS LAST, source",
            _wanted(keys)).fetchall():
        if cal is not None and cals is not None and cals.get(int(k)) != cal:
            continue
        out.setdefault((int(k), int(f)), []).append({"label": label, "source": source,
                                                      "score": None if score is None else float(score),
                                                      "calibration_id": None if cal is None else int(cal)})
    return out


def ranking_calibrations(con: duckdb.DuckDBPyConnection, sae_keys: Sequence[int], model_key: int,
                         calibration_id: int | None) -> dict[int, int | None]:
    """Per SAE, the calibration a run's ranking used, from the one its response names
    (``calibration_id``: a pinned one, which holds statistics for every SAE, else the newest among the
    SAEs' own): that one where it holds statistics for the SAE, else the model's newest for it."""
    held = {int(k) for (k,) in con.execute(
        "SELECT DISTINCT sae_key FROM feature_stats WHERE calibration_id = ? AND list_contains(?, sae_key)",
        [calibration_id, list(sae_keys)]).fetchall()} if calibration_id is not None else set()
    return {k: calibration_id if k in held else calibration_for(con, k, model_key) for k in sae_keys}


def run_report_data(catalog: Catalog, run_key: int, model_key: int, features: Sequence[Feature],
                    calibration_id: int | None = None) -> dict:
    """Everything a run report shows besides the ranking: ``tokens``, and per feature (in the order given,
    as ``features``) its ``positions``/``acts``/``attr`` in the run, its calibration ``histogram``
    (None without a calibration), its ``labels`` and the tokens its decoder ``promotes`` and
    ``suppresses`` (from the lite label; None without one) — histogram and lite label from the
    calibrations the ranking used (:func:`ranking_calibrations`; ``calibration_id``: its response's)."""
    by_hook = {(s["layer"], s["stream"]): int(s["sae_key"]) for s in run_saes(catalog, run_key)}
    keys = [(by_hook[(layer, stream)], f) for layer, stream, f in features if (layer, stream) in by_hook]
    con = catalog.raw()
    try:
        tokens = run_tokens(con, run_key)
        acts = feature_activations(con, run_key, keys)
        cals = ranking_calibrations(con, sorted({k for k, _ in keys}), model_key, calibration_id)
        labels = feature_labels(con, keys, cals)
        hists: dict[int, dict[int, dict]] = {}
        for sae_key in sorted({k for k, _ in keys}):
            hists[sae_key] = histograms(con, cals[sae_key], sae_key, [f for k, f in keys if k == sae_key])
    finally:
        con.close()
    out = []
    for layer, stream, f in features:
        key = by_hook.get((layer, stream))
        found = acts.get((key, f), {"positions": [], "acts": [], "attr": None}) if key is not None else \
            {"positions": [], "acts": [], "attr": None}
        its_labels = labels.get((key, f), []) if key is not None else []
        lite = next((lite_parts(x["label"]) for x in its_labels if x["source"] == "lite"), None)
        out.append({**found, "histogram": hists.get(key, {}).get(f) if key is not None else None,
                    "labels": its_labels, "promotes": None if lite is None else lite.get("promotes", []),
                    "suppresses": None if lite is None else lite.get("suppresses", [])})
    return {"tokens": tokens, "features": out}
