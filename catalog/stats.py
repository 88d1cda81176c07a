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
from catalog.scoring import QUANTILES_CTES
from catalog.writes import ModelInfo, SAEInfo, append_rows, model_key_of, sae_keys, scanned, transaction, with_sae_keys

TauBasis = Literal["active", "all"]
TAU_BASES: tuple[str, ...] = get_args(TauBasis)
# the feature_stats column holding each basis's P95
P95_COLUMN = {"active": "p95", "all": "p95_all"}


def write_calibration(catalog: Catalog, model: ModelInfo, saes: Sequence[SAEInfo], corpus: str, corpus_hash: str,
                      n_docs: int, tokens: pa.Table, acts: pa.Table, q: float = 0.95, extend: int | None = None) -> int:
    """Store a calibration and compute each feature's p95 (both bases)/mean/max/density in SQL, in one transaction.

    ``tokens``: doc int32, position int32, token_id int32, token string — every analysed token.
    ``acts``: doc, position, sae_index, feature_id, act — nonzero codes of those tokens.
    ``extend``: add these SAEs to that calibration (:func:`calibration_to_extend`: the same model and
    corpus, so the same tokens, stored once) instead of making a new one, when it holds exactly these
    tokens at these (doc, position)s (:func:`_same_pass`); the id written to is returned.
    """
    n_tokens = tokens.num_rows
    if n_tokens == 0:
        raise CatalogError("corpus", "the calibration corpus produced no tokens")
    with transaction(catalog, "a calibration") as con:
        model_key = model_key_of(con, model)
        keys = sae_keys(con, saes)
        if extend is not None and not _same_pass(con, extend, model_key, corpus_hash, n_docs, tokens):
            extend = None  # not the same pass over the same tokens: a calibration of its own
        if extend is None:
            cal_id = int(con.execute(
                "INSERT INTO calibrations (model_key, corpus, corpus_hash, n_docs, n_tokens) VALUES (?, ?, ?, ?, ?) "
                "RETURNING calibration_id", [model_key, corpus, corpus_hash, n_docs, n_tokens]).fetchone()[0])
            append_rows(con, "calibration_tokens", tokens, calibration_id=cal_id)
        else:
            cal_id = extend
        con.execute("INSERT INTO calibration_saes SELECT ?, unnest(?::INTEGER[])", [cal_id, keys])
        append_rows(con, "calibration_activations", with_sae_keys(acts, [np.asarray(keys)], [acts.num_rows]),
                    calibration_id=cal_id)
        for sae, key in zip(saes, keys, strict=True):
            con.execute(FEATURE_STATS_SQL, feature_stats_params(cal_id, key, n_tokens, sae.d_sae, q))
        return cal_id


def _same_pass(con: duckdb.DuckDBPyConnection, calibration_id: int, model_key: int, corpus_hash: str, n_docs: int,
               tokens: pa.Table) -> bool:
    """Whether calibration ``calibration_id`` is of this model and corpus and holds exactly these tokens
    at these (doc, position)s — not only as many: SAEs that differ in ``prepend_bos`` shift every
    position by one, and a calibration's activations join its tokens by position."""
    held = con.execute("SELECT model_key, corpus_hash, n_docs FROM calibrations WHERE calibration_id = ?",
                       [calibration_id]).fetchall()  # fetched whole: DuckDB refuses new work beside an open result
    if held != [(model_key, corpus_hash, n_docs)]:
        return False
    digest = "SELECT count(*), sum(hash(doc, position, token_id)) FROM {}"
    with scanned(con, _offered_tokens=tokens):
        offered = con.execute(digest.format("_offered_tokens")).fetchall()
    stored = con.execute(digest.format("calibration_tokens WHERE calibration_id = ?"), [calibration_id]).fetchall()
    return offered == stored


# one SAE's feature_stats rows of a calibration (also run over a Delta store: catalog.store); its
# quantiles are those of catalog.scoring.QUANTILES_CTES, the ones a ranking's ``tau_quantile`` uses
FEATURE_STATS_SELECT = f"""
    WITH quantile_of AS (SELECT $cal AS cal, $sae AS sae_key, $n AS n),{QUANTILES_CTES.format(q="$q::DOUBLE")}
    SELECT $cal AS calibration_id, $sae AS sae_key, f.feature_id,
           coalesce(s.q_active, 0) AS p95,
           coalesce(s.q_all, 0) AS p95_all,
           coalesce(s.total, 0) / $n AS mean,
           coalesce(s.max, 0) AS max,
           coalesce(s.k, 0) / $n AS density,
           $n AS n_tokens
    FROM (SELECT range::INTEGER AS feature_id FROM range($d_sae)) f
    LEFT JOIN quantiles s USING (feature_id)
    ORDER BY f.feature_id
"""

FEATURE_STATS_SQL = f"""
    INSERT INTO feature_stats (calibration_id, sae_key, feature_id, p95, p95_all, mean, max, density, n_tokens)
    {FEATURE_STATS_SELECT}
"""


def feature_stats_params(calibration_id: int, sae_key: int, n_tokens: int, d_sae: int, q: float = 0.95) -> dict:
    """The parameters of :data:`FEATURE_STATS_SELECT` for one SAE of a calibration."""
    return {"cal": calibration_id, "sae": sae_key, "n": n_tokens, "d_sae": d_sae, "q": q}


def calibration_for(con: duckdb.DuckDBPyConnection, sae_key: int, model_key: int | None = None,
                    model_id: str | None = None) -> int | None:
    """The newest calibration with statistics for this SAE — of this model when ``model_key`` is given
    (a run's τ and normalization come from its own model's activations), of any model with id
    ``model_id`` (any of its weight fingerprints: ``feature show --model``), else of any model."""
    if model_key is None and model_id is None:
        row = con.execute("SELECT max(calibration_id) FROM feature_stats WHERE sae_key = ?", [sae_key]).fetchone()
    else:
        row = con.execute("SELECT max(f.calibration_id) FROM feature_stats f JOIN calibrations c USING (calibration_id) "
                          "JOIN models m USING (model_key) WHERE f.sae_key = $sae AND coalesce(c.model_key = $key, true) "
                          "AND coalesce(m.model_id = $id, true)", {"sae": sae_key, "key": model_key, "id": model_id}
                          ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def calibration_to_extend(catalog: Catalog, model_id: str, fingerprint: str, corpus_hash: str) -> int | None:
    """The newest calibration of this model (id and weights fingerprint) on a corpus of this hash: a
    first-use calibration of more SAEs adds them to it (:func:`write_calibration`'s ``extend``), so that
    one calibration covers every SAE a ranking uses and ``calibration_id`` can pin it."""
    con = catalog.raw()
    try:
        row = con.execute("SELECT max(c.calibration_id) FROM calibrations c JOIN models m USING (model_key) "
                          "WHERE m.model_id = ? AND m.fingerprint = ? AND c.corpus_hash = ?",
                          [model_id, fingerprint, corpus_hash]).fetchone()
    finally:
        con.close()
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
    ``catalog.report.lite_parts``). They belong to the calibration (both parts depend on its model): a
    ranking shows those of the calibration it used."""
    con = catalog.raw()
    try:
        (key,) = sae_keys(con, [sae])
        fires = dict(con.execute(LITE_FIRES_SQL, {"cal": calibration_id, "sae": key, "top": top}).fetchall())
    finally:
        con.close()
    written, _ = write_labels(catalog, [(sae, lite_label_rows(fires, promotes, suppresses))], replace=["lite"],
                              calibration_id=calibration_id)
    return written


def lite_label_rows(fires: dict[int, list[str]], promotes: dict[int, list[str]],
                    suppresses: dict[int, list[str]] | None = None) -> pa.Table:
    """The lite labels (feature_id, label, source, score) of one SAE from the tokens each feature fires on
    (:data:`LITE_FIRES_SQL`) and those its decoder promotes and suppresses."""
    suppresses = suppresses or {}
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
    return pa.table({"feature_id": pa.array(features, pa.int32()), "label": labels,
                     "source": ["lite"] * len(features), "score": pa.nulls(len(features), pa.float64())})


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
