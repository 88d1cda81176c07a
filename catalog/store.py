"""Writes: a run, a calibration (with its feature statistics, in SQL), labels — each in one transaction.

Bulk rows arrive as pyarrow tables and go in through DuckDB's Arrow scan
(``INSERT INTO t BY NAME SELECT ... FROM arrow_table``), never row by row: ~10^6-10^7 rows/s.

Runs are atomic: each is visible whole or not at all. Several runs finished together (a batch's
micro-batch) are written by :func:`write_runs` in one transaction holding only whole runs (group
commit): on DuckDB 2.0 every INSERT statement costs ~0.5 ms and every commit ~1 ms here whatever its
size, so four statements for eight runs instead of four per run is what lets batch ingest keep up
with the model. A crash loses at most that uncommitted group, which a rerun recomputes.

Columnar batch schema (what ``ingest`` hands over):
- tokens: position int32, token_id int32, token string, is_generated bool, is_special bool, kept bool, proxy float64
- activations: position int32, sae_index int16 (index into the batch's SAE list), feature_id int32, act float32
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from catalog import schema
from catalog.db import Catalog, CatalogError


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    fingerprint: str
    family: str = ""
    n_layers: int = 0
    d_model: int = 0


@dataclass(frozen=True)
class SAEInfo:
    sae_id: str
    layer: int
    stream: str
    fingerprint: str
    hook_name: str = ""
    architecture: str = ""
    d_in: int = 0
    d_sae: int = 0


@contextmanager
def transaction(catalog: Catalog) -> Iterator[duckdb.DuckDBPyConnection]:
    """One DuckDB transaction on a fresh cursor; rolled back whole on any error."""
    with catalog.write_lock:
        con = catalog.raw()
        con.begin()
        catalog.pending_keys.clear()
        try:
            yield con
            con.commit()
            catalog.known_keys.update(catalog.pending_keys)  # keys are trusted once their rows are committed
        except BaseException:
            con.rollback()
            raise
        finally:
            catalog.pending_keys.clear()
            con.close()


def _model_key(con: duckdb.DuckDBPyConnection, model: ModelInfo, catalog: Catalog | None = None) -> int:
    cache_key = ("model", model.model_id, model.fingerprint)
    if catalog is not None and cache_key in catalog.known_keys:
        return catalog.known_keys[cache_key]
    # fetchall, not fetchone: an unfinished result would block the next statement's Arrow scan
    row = next(iter(con.execute("SELECT model_key FROM models WHERE model_id = ? AND fingerprint = ?",
                                [model.model_id, model.fingerprint]).fetchall()), None)
    if row is None:
        row = con.execute(
            "INSERT INTO models (model_id, fingerprint, family, n_layers, d_model) VALUES (?, ?, ?, ?, ?) "
            "RETURNING model_key", [model.model_id, model.fingerprint, model.family, model.n_layers, model.d_model],
        ).fetchone()
    if catalog is not None:
        catalog.pending_keys[cache_key] = int(row[0])
    return int(row[0])


def sae_keys(con: duckdb.DuckDBPyConnection, saes: Sequence[SAEInfo], catalog: Catalog | None = None) -> list[int]:
    """The catalog key of each SAE (same id, hook and weights fingerprint → same key), created if new.
    Inside a write transaction pass ``catalog``: keys committed before are then read from memory."""
    keys = []
    for sae in saes:
        if catalog is not None and sae in catalog.known_keys:
            keys.append(catalog.known_keys[sae])
            continue
        row = next(iter(con.execute(  # fetchall: an unfinished result would block the Arrow scan
            "SELECT sae_key FROM saes WHERE sae_id = ? AND layer = ? AND stream = ? AND fingerprint = ?",
            [sae.sae_id, sae.layer, sae.stream, sae.fingerprint]).fetchall()), None)
        if row is None:
            row = con.execute(
                "INSERT INTO saes (sae_id, layer, stream, hook_name, architecture, d_in, d_sae, fingerprint) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING sae_key",
                [sae.sae_id, sae.layer, sae.stream, sae.hook_name, sae.architecture, sae.d_in, sae.d_sae,
                 sae.fingerprint]).fetchone()
        keys.append(int(row[0]))
        if catalog is not None:
            catalog.pending_keys[sae] = int(row[0])
    return keys


def _append(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table, **keys: int) -> None:
    """Bulk-insert an Arrow table (columns by name) plus constant key columns, via DuckDB's Arrow scan."""
    _arrow_rows = rows  # read by name by DuckDB (a replacement scan): no register/unregister round trip
    constants = "".join(f"{int(value)}::INTEGER AS {name}, " for name, value in keys.items())
    con.execute(f"INSERT INTO {table} BY NAME SELECT {constants}* FROM _arrow_rows")


def _with_sae_keys(acts: pa.Table, key_lists: list[np.ndarray], counts: list[int]) -> pa.Table:
    """Replace ``sae_index`` by the catalog's ``sae_key`` (a numpy take, no join). ``acts`` stacks the
    rows of several runs (``counts`` rows each), each run's index pointing into its own key list; the
    lists are laid end to end so one lookup serves them all."""
    index = acts.column("sae_index").to_numpy()
    if len(index) and (index >= np.repeat([len(k) for k in key_lists], counts)).any():
        raise CatalogError("activations sae_index: an index beyond its run's SAE list")
    offsets = np.repeat(np.cumsum([0, *[len(k) for k in key_lists[:-1]]]), counts).astype(np.int64)
    mapped = np.concatenate(key_lists).astype(np.int32)[offsets + index] if len(index) else np.zeros(0, np.int32)
    return acts.drop_columns(["sae_index"]).append_column("sae_key", pa.array(mapped, type=pa.int32()))


def find_runs(catalog: Catalog, run_ids: Sequence[str]) -> dict[str, dict]:
    """The stored runs among ``run_ids`` (one query for a whole batch), by run_id."""
    if not run_ids:
        return {}
    con = catalog.raw()
    try:
        cur = con.execute("SELECT * FROM runs WHERE list_contains(?, run_id)", [list(run_ids)])
        cols = [d[0] for d in cur.description]
        return {row["run_id"]: row for row in (dict(zip(cols, r, strict=True)) for r in cur.fetchall())}
    finally:
        con.close()


def find_run(catalog: Catalog, run_id: str) -> dict | None:
    return find_runs(catalog, [run_id]).get(run_id)


@dataclass(frozen=True)
class RunRows:
    """One run as ingest hands it over: its ``runs`` row, model, SAEs and columnar rows (schema above)."""

    run: dict
    model: ModelInfo
    saes: Sequence[SAEInfo]
    tokens: pa.Table
    activations: pa.Table


def write_run(catalog: Catalog, run: dict, model: ModelInfo, saes: Sequence[SAEInfo], tokens: pa.Table,
              acts: pa.Table) -> tuple[int, bool]:
    """Store one run whole (or not at all). Returns ``(run_key, created)``; an existing run_id is kept."""
    return write_runs(catalog, [RunRows(run, model, saes, tokens, acts)])[0]


def write_runs(catalog: Catalog, runs: Sequence[RunRows]) -> list[tuple[int, bool]]:
    """Store whole runs in one transaction (group commit; see the module docstring): one INSERT per
    table for all of them. Returns ``(run_key, created)`` per run; a run_id already stored (or repeated
    in ``runs``) keeps its first row.

    The caller has usually looked the runs up already, so the write first goes ahead without a lookup;
    a run_id stored meanwhile (another request, a rerun) trips the unique index, the transaction rolls
    back whole and the write is redone with the lookup."""
    try:
        return _write_runs(catalog, runs, look_up=False)
    except duckdb.ConstraintException:
        return _write_runs(catalog, runs, look_up=True)


def _write_runs(catalog: Catalog, runs: Sequence[RunRows], look_up: bool) -> list[tuple[int, bool]]:
    with transaction(catalog) as con:
        keys: dict[str, int] = {}
        if look_up:
            keys = {rid: int(k) for rid, k in con.execute(
                "SELECT run_id, run_key FROM runs WHERE list_contains(?, run_id)", [[r.run["run_id"] for r in runs]]
            ).fetchall()}
        fresh: dict[str, RunRows] = {}
        created = []
        for r in runs:
            rid = r.run["run_id"]
            created.append(rid not in keys and rid not in fresh)
            if created[-1]:
                fresh[rid] = r
        if fresh:
            keys.update(_insert_runs(con, catalog, list(fresh.values())))
        return [(keys[r.run["run_id"]], made) for r, made in zip(runs, created, strict=True)]


def _insert_runs(con: duckdb.DuckDBPyConnection, catalog: Catalog, runs: list[RunRows]) -> dict[str, int]:
    """One INSERT per table for all ``runs``: their rows stacked into single-chunk Arrow tables (DuckDB
    scans one chunk of 50k rows several times faster than 16 chunks of 3k). Returns run_id → run_key."""
    rows, sae_key_maps = [], []
    for r in runs:
        sae_key_maps.append(np.asarray(sae_keys(con, r.saes, catalog), dtype=np.int32))
        fields = {**r.run, "model_key": _model_key(con, r.model, catalog)}
        for name in ("layers", "streams", "restrict_features", "timings"):
            if not isinstance(fields.get(name), str):
                fields[name] = json.dumps(fields.get(name))
        rows.append(fields)
    names = dict.fromkeys(n for row in rows for n in row)  # as columns: ~3x faster than binding each value
    _arrow_rows = pa.table({n: pa.array([row.get(n) for row in rows], _RUN_TYPES[n]) for n in names})  # scanned by name
    created = dict(con.execute("INSERT INTO runs BY NAME SELECT * FROM _arrow_rows RETURNING run_id, run_key").fetchall())
    run_keys = [int(created[r.run["run_id"]]) for r in runs]
    _append(con, "run_saes", pa.table({"run_key": _repeat(run_keys, [len(m) for m in sae_key_maps]),
                                       "sae_key": pa.array(np.concatenate(sae_key_maps), pa.int32())}))
    tokens = pa.concat_tables([r.tokens for r in runs]).combine_chunks()
    _append(con, "tokens", tokens.append_column("run_key", _repeat(run_keys, [r.tokens.num_rows for r in runs])))
    acts = pa.concat_tables([r.activations for r in runs]).combine_chunks()
    counts = [r.activations.num_rows for r in runs]
    _append(con, "activations", _with_sae_keys(acts, sae_key_maps, counts).append_column("run_key", _repeat(run_keys, counts)))
    return dict(zip((r.run["run_id"] for r in runs), run_keys, strict=True))


def _arrow_type(column: sa.Column) -> pa.DataType:
    """The Arrow type of a catalog column: typed arrays skip pyarrow's per-call inference (which tries
    to import pandas and dateutil every time when they are not installed)."""
    for sql_type, arrow in ((sa.BigInteger, pa.int64()), (sa.Integer, pa.int32()), (sa.Boolean, pa.bool_()),
                            (sa.Float, pa.float64()), (sa.DateTime, pa.timestamp("us")), (sa.String, pa.string())):
        if isinstance(column.type, sql_type):
            return arrow
    raise TypeError(f"no Arrow type for {column.name}: {column.type}")


_RUN_TYPES = {c.name: _arrow_type(c) for c in schema.runs.columns}


def _repeat(values: list[int], counts: list[int]) -> pa.Array:
    return pa.array(np.repeat(np.asarray(values, dtype=np.int32), counts), pa.int32())


def run_saes(catalog: Catalog, run_key: int) -> list[dict]:
    con = catalog.raw()
    try:
        cur = con.execute("SELECT s.* FROM run_saes rs JOIN saes s USING (sae_key) WHERE rs.run_key = ? "
                          "ORDER BY s.layer, s.stream", [run_key])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


# -- calibration ----------------------------------------------------------------------------------

def write_calibration(catalog: Catalog, model: ModelInfo, saes: Sequence[SAEInfo], corpus: str, corpus_hash: str,
                      n_docs: int, tokens: pa.Table, acts: pa.Table, q: float = 0.95) -> int:
    """Store a calibration and compute each feature's p95/mean/max/density in SQL, in one transaction.

    ``tokens``: doc int32, position int32, token_id int32, token string — every analysed token.
    ``acts``: doc, position, sae_index, feature_id, act — nonzero codes of those tokens.
    """
    n_tokens = tokens.num_rows
    if n_tokens == 0:
        raise CatalogError("corpus: the calibration corpus produced no tokens")
    with transaction(catalog) as con:
        model_key = _model_key(con, model)
        keys = sae_keys(con, saes)
        cal_id = int(con.execute(
            "INSERT INTO calibrations (model_key, corpus, corpus_hash, n_docs, n_tokens) VALUES (?, ?, ?, ?, ?) "
            "RETURNING calibration_id", [model_key, corpus, corpus_hash, n_docs, n_tokens]).fetchone()[0])
        con.execute("INSERT INTO calibration_saes SELECT ?, unnest(?::INTEGER[])", [cal_id, keys])
        _append(con, "calibration_tokens", tokens, calibration_id=cal_id)
        _append(con, "calibration_activations", _with_sae_keys(acts, [np.asarray(keys)], [acts.num_rows]),
                calibration_id=cal_id)
        for sae, key in zip(saes, keys, strict=True):
            con.execute(FEATURE_STATS_SQL, {"cal": cal_id, "sae": key, "n": n_tokens, "d_sae": sae.d_sae,
                                            **quantile_positions(n_tokens, q)})
        return cal_id


def quantile_positions(n: int, q: float) -> dict:
    """Linear interpolation between order statistics (numpy's default, DuckDB's quantile_cont):
    the q-quantile of n sorted values a_0..a_{n-1} is a_lo + frac * (a_hi - a_lo) with h = (n-1) q."""
    h = (n - 1) * q
    lo = int(np.floor(h))
    return {"lo": lo, "hi": min(lo + 1, n - 1), "frac": h - lo}


# The quantile of a feature's *dense* column (zeros included) from its sparse nonzero rows: with n
# tokens and k nonzeros (all codes are >= 0), the sorted dense column is n-k zeros followed by the
# nonzeros in ascending order, so dense index i holds the (i-(n-k))-th nonzero, or 0 when i < n-k.
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
               coalesce(max(act) FILTER (WHERE $n - k + r = $hi), 0) AS v_hi
        FROM ranked GROUP BY feature_id
    )"""

FEATURE_STATS_SQL = f"""
    INSERT INTO feature_stats (calibration_id, sae_key, feature_id, p95, mean, max, density, n_tokens)
    WITH {QUANTILE_CTE}
    SELECT $cal, $sae, f.feature_id,
           coalesce(s.v_lo + $frac * (s.v_hi - s.v_lo), 0),
           coalesce(s.total, 0) / $n,
           coalesce(s.max_act, 0),
           coalesce(s.k, 0) / $n,
           $n
    FROM (SELECT range::INTEGER AS feature_id FROM range($d_sae)) f
    LEFT JOIN sparse_stats s USING (feature_id)
    ORDER BY f.feature_id
"""


# -- labels ---------------------------------------------------------------------------------------

def write_labels(catalog: Catalog, groups: Sequence[tuple[SAEInfo, pa.Table]], replace: Sequence[str] | None = None
                 ) -> int:
    """Import labels (feature_id int, label str, source str, score float|null) for one or more SAEs,
    all in one transaction (a bad group leaves nothing behind). Importing a source again replaces that
    source's labels for the SAE rather than adding duplicates: ``replace`` names the sources to clear
    (default: the sources present in the rows)."""
    total = 0
    with transaction(catalog) as con:
        for sae, rows in groups:
            (key,) = sae_keys(con, [sae])
            sources = list(replace) if replace is not None else sorted(set(rows.column("source").to_pylist()))
            if sources:
                con.execute("DELETE FROM labels WHERE sae_key = ? AND list_contains(?, source)", [key, sources])
            _append(con, "labels", rows.select(["feature_id", "label", "source", "score"]), sae_key=key)
            total += rows.num_rows
    return total


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
                      top: int = 5) -> int:
    """Lite proto-labels (source ``lite``): the tokens a feature fires on most in the calibration corpus
    (by total activation, in SQL) and the tokens its decoder direction promotes (computed by ingest)."""
    con = catalog.raw()
    try:
        (key,) = sae_keys(con, [sae])
        fires = dict(con.execute(LITE_FIRES_SQL, {"cal": calibration_id, "sae": key, "top": top}).fetchall())
    finally:
        con.close()
    features = sorted(set(fires) | set(promotes))
    labels = []
    for f in features:
        parts = []
        for verb, tokens in (("fires on", fires.get(f)), ("promotes", promotes.get(f))):
            shown = [json.dumps(t, ensure_ascii=False) for t in tokens or [] if t.strip("\ufffd")]
            if shown:
                parts.append(f"{verb} " + ", ".join(shown))
        labels.append("; ".join(parts))
    rows = pa.table({"feature_id": pa.array(features, pa.int32()), "label": labels,
                     "source": ["lite"] * len(features), "score": pa.nulls(len(features), pa.float64())})
    return write_labels(catalog, [(sae, rows)], replace=["lite"])
