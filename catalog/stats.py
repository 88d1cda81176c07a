"""Calibrations and feature statistics: writing a calibration (its per-feature p95/mean/max/density
computed in SQL), finding the calibration a ranking uses, and the lite labels built from it.

Each feature gets two quantiles, both exact (numpy's ``percentile``, DuckDB's ``quantile_cont``):
``p95`` over its *firing distribution* (its nonzero activations; the default τ, ``tau_basis = active``)
and ``p95_all`` over its *dense* column (zeros included, ``tau_basis = all``), computed from the sparse
nonzero rows as if the zeros were there. A feature that never fired has 0 for both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal, get_args

import duckdb
import numpy as np
import pyarrow as pa

from catalog.db import Catalog
from catalog.errors import CatalogError
from catalog.labels import write_labels
from catalog.writes import ModelInfo, SAEInfo, append_rows, model_key_of, sae_keys, transaction, with_sae_keys

TauBasis = Literal["active", "all"]
TAU_BASES: tuple[str, ...] = get_args(TauBasis)
# the feature_stats column holding each basis's P95
P95_COLUMN = {"active": "p95", "all": "p95_all"}


def write_calibration(catalog: Catalog, model: ModelInfo, saes: Sequence[SAEInfo], corpus: str, corpus_hash: str,
                      n_docs: int, tokens: pa.Table, acts: pa.Table, q: float = 0.95) -> int:
    """Store a calibration and compute each feature's p95 (both bases)/mean/max/density in SQL, in one transaction.

    ``tokens``: doc int32, position int32, token_id int32, token string — every analysed token.
    ``acts``: doc, position, sae_index, feature_id, act — nonzero codes of those tokens.
    """
    n_tokens = tokens.num_rows
    if n_tokens == 0:
        raise CatalogError("corpus", "the calibration corpus produced no tokens")
    with transaction(catalog, "a calibration") as con:
        model_key = model_key_of(con, model)
        keys = sae_keys(con, saes)
        cal_id = int(con.execute(
            "INSERT INTO calibrations (model_key, corpus, corpus_hash, n_docs, n_tokens) VALUES (?, ?, ?, ?, ?) "
            "RETURNING calibration_id", [model_key, corpus, corpus_hash, n_docs, n_tokens]).fetchone()[0])
        con.execute("INSERT INTO calibration_saes SELECT ?, unnest(?::INTEGER[])", [cal_id, keys])
        append_rows(con, "calibration_tokens", tokens, calibration_id=cal_id)
        append_rows(con, "calibration_activations", with_sae_keys(acts, [np.asarray(keys)], [acts.num_rows]),
                    calibration_id=cal_id)
        for sae, key in zip(saes, keys, strict=True):
            con.execute(FEATURE_STATS_SQL, {"cal": cal_id, "sae": key, "n": n_tokens, "d_sae": sae.d_sae, "q": q,
                                            **quantile_positions(n_tokens, q)})
        return cal_id


def quantile_positions(n: int, q: float) -> dict:
    """Linear interpolation between order statistics (numpy's default, DuckDB's quantile_cont):
    the q-quantile of n sorted values a_0..a_{n-1} is a_lo + frac * (a_hi - a_lo) with h = (n-1) q."""
    h = (n - 1) * q
    lo = int(np.floor(h))
    return {"lo": lo, "hi": min(lo + 1, n - 1), "frac": h - lo}


# Both quantiles of a feature from its sparse nonzero rows. ``q_active``: over the nonzeros alone
# (quantile_cont is numpy's interpolation). ``v_lo``/``v_hi``: the order statistics of its *dense*
# column (zeros included) — with n tokens and k nonzeros (all codes are >= 0), the sorted dense column
# is n-k zeros followed by the nonzeros in ascending order, so dense index i holds the (i-(n-k))-th
# nonzero, or 0 when i < n-k.
QUANTILE_CTE = """
    ranked AS (
        SELECT feature_id, act,
               row_number() OVER (PARTITION BY feature_id ORDER BY act) - 1 AS r,
               count(*) OVER (PARTITION BY feature_id) AS k
        FROM calibration_activations
        WHERE calibration_id = $cal AND sae_key = $sae
    ),
    sparse_stats AS (
        SELECT feature_id, any_value(k) AS k, sum(act) AS total, max(act) AS max_act,
               coalesce(max(act) FILTER (WHERE $n - k + r = $lo), 0) AS v_lo,
               coalesce(max(act) FILTER (WHERE $n - k + r = $hi), 0) AS v_hi,
               quantile_cont(act::DOUBLE, $q) AS q_active
        FROM ranked GROUP BY feature_id
    )"""

FEATURE_STATS_SQL = f"""
    INSERT INTO feature_stats (calibration_id, sae_key, feature_id, p95, p95_all, mean, max, density, n_tokens)
    WITH {QUANTILE_CTE}
    SELECT $cal, $sae, f.feature_id,
           coalesce(s.q_active, 0),
           coalesce(s.v_lo + $frac * (s.v_hi - s.v_lo), 0),
           coalesce(s.total, 0) / $n,
           coalesce(s.max_act, 0),
           coalesce(s.k, 0) / $n,
           $n
    FROM (SELECT range::INTEGER AS feature_id FROM range($d_sae)) f
    LEFT JOIN sparse_stats s USING (feature_id)
    ORDER BY f.feature_id
"""


def quantile_sql(con: duckdb.DuckDBPyConnection, calibration_id: int, sae_key: int, q: float,
                 basis: TauBasis = "active") -> str:
    """A relation (sae_key, feature_id, tau): the q-quantile of each feature in that calibration on
    ``basis`` (its nonzero activations, or its dense column), computed exactly like the stored p95 /
    p95_all (features that never fired are absent: 0)."""
    n = con.execute("SELECT n_tokens FROM calibrations WHERE calibration_id = ?", [calibration_id]).fetchone()[0]
    pos = quantile_positions(n, q)
    cte = QUANTILE_CTE.replace("$cal", str(int(calibration_id))).replace("$sae", str(int(sae_key))) \
        .replace("$n", str(n)).replace("$lo", str(pos["lo"])).replace("$hi", str(pos["hi"])).replace("$q", repr(float(q)))
    tau = "q_active" if basis == "active" else f"v_lo + {pos['frac']!r} * (v_hi - v_lo)"
    return f"(WITH {cte} SELECT {int(sae_key)} AS sae_key, feature_id, {tau} AS tau FROM sparse_stats)"


def calibration_for(con: duckdb.DuckDBPyConnection, sae_key: int, model_key: int | None = None) -> int | None:
    """The newest calibration with statistics for this SAE — of this model when ``model_key`` is given
    (a run's τ and normalization come from its own model's activations), else of any model."""
    if model_key is None:
        row = con.execute("SELECT max(calibration_id) FROM feature_stats WHERE sae_key = ?", [sae_key]).fetchone()
    else:
        row = con.execute("SELECT max(f.calibration_id) FROM feature_stats f JOIN calibrations c USING (calibration_id) "
                          "WHERE f.sae_key = ? AND c.model_key = ?", [sae_key, model_key]).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def has_calibration(catalog: Catalog, sae: SAEInfo, model_id: str, fingerprint: str) -> bool:
    """Whether this model (id and weights fingerprint) has calibrated this SAE: statistics exist for
    the pair. A pure read: an SAE or model the catalog has never seen simply has none."""
    con = catalog.raw()
    try:
        (found,) = con.execute("""
            SELECT EXISTS (
                SELECT 1 FROM feature_stats f
                JOIN calibrations c USING (calibration_id)
                JOIN models m USING (model_key)
                JOIN saes s ON s.sae_key = f.sae_key
                WHERE s.sae_id = ? AND s.layer = ? AND s.stream = ? AND s.fingerprint = ?
                  AND m.model_id = ? AND m.fingerprint = ?)""",
            [sae.sae_id, sae.layer, sae.stream, sae.fingerprint, model_id, fingerprint]).fetchone()
    finally:
        con.close()
    return bool(found)


def newest_stats_sql(cals: dict[int, int | None]) -> str:
    """Feature statistics of each SAE's calibration (``cals``: sae_key → calibration_id, None for
    none; what ``v_feature_stats`` shows for the newest), as a relation filtered by literal
    (calibration, SAE) pairs, so zone maps prune it to a few row groups."""
    pairs = [f"(calibration_id = {int(c)} AND sae_key = {int(k)})" for k, c in cals.items() if c is not None]
    return f"SELECT * FROM feature_stats WHERE {' OR '.join(pairs) or 'false'}"


# -- lite labels ----------------------------------------------------------------------------------

LITE_FIRES_SQL = """
    WITH per_token AS (
        SELECT a.feature_id, t.token, sum(a.act) AS total
        FROM calibration_activations a
        JOIN calibration_tokens t USING (calibration_id, doc, position)
        WHERE a.calibration_id = $cal AND a.sae_key = $sae
        GROUP BY a.feature_id, t.token
    ), ranked AS (
        SELECT *, row_number() OVER (PARTITION BY feature_id ORDER BY total DESC, token) AS rk FROM per_token
    )
    SELECT feature_id, list(token ORDER BY rk) AS tokens FROM ranked WHERE rk <= $top GROUP BY feature_id
"""


def write_lite_labels(catalog: Catalog, calibration_id: int, sae: SAEInfo, promotes: dict[int, list[str]],
                      suppresses: dict[int, list[str]] | None = None, top: int = 5) -> int:
    """Lite proto-labels (source ``lite``): the tokens a feature fires on most in the calibration corpus
    (by total activation, in SQL) and the tokens its decoder direction promotes and suppresses (computed
    by ingest), as ``fires on "a", "b"; promotes "c"; suppresses "d"`` (parsed back by
    ``catalog.report.lite_parts``)."""
    suppresses = suppresses or {}
    con = catalog.raw()
    try:
        (key,) = sae_keys(con, [sae])
        fires = dict(con.execute(LITE_FIRES_SQL, {"cal": calibration_id, "sae": key, "top": top}).fetchall())
    finally:
        con.close()
    features = sorted(set(fires) | set(promotes) | set(suppresses))
    labels = []
    for f in features:
        parts = []
        for verb, tokens in (("fires on", fires.get(f)), ("promotes", promotes.get(f)),
                             ("suppresses", suppresses.get(f))):
            shown = [json.dumps(t, ensure_ascii=False) for t in tokens or [] if t.strip("\ufffd")]
            if shown:
                parts.append(f"{verb} " + ", ".join(shown))
        labels.append("; ".join(parts))
    rows = pa.table({"feature_id": pa.array(features, pa.int32()), "label": labels,
                     "source": ["lite"] * len(features), "score": pa.nulls(len(features), pa.float64())})
    return write_labels(catalog, [(sae, rows)], replace=["lite"])


# -- how stable a calibration's quantiles are -------------------------------------------------------

# A feature's P95 over its firing distribution is taken as stable when it rests on at least this many
# nonzero activations (with fewer, it is the feature's top one or two values: one outlier moves τ);
# ``calibrate`` warns when more than THIN_SHARE of the features that fired have fewer.
MIN_FIRINGS = 20
THIN_SHARE = 0.10


def thin_features(catalog: Catalog, calibration_id: int) -> list[dict]:
    """Per SAE of a calibration: how many features fired at all (``fired``), and how many of them fired
    on fewer than :data:`MIN_FIRINGS` tokens (``thin``: their P95 is unstable)."""
    con = catalog.raw()
    try:
        rows = con.execute("""
            SELECT s.layer, s.stream, count(*) FILTER (WHERE f.density > 0) AS fired,
                   count(*) FILTER (WHERE f.density > 0 AND round(f.density * f.n_tokens) < ?) AS thin
            FROM feature_stats f JOIN saes s USING (sae_key) WHERE f.calibration_id = ?
            GROUP BY s.layer, s.stream ORDER BY s.layer, s.stream""", [MIN_FIRINGS, calibration_id]).fetchall()
    finally:
        con.close()
    return [dict(zip(("layer", "stream", "fired", "thin"), r, strict=True)) for r in rows]
