"""Writes of runs, each in one transaction, plus what every catalog write shares: the transaction,
model/SAE key look-ups and Arrow appends (calibrations in ``catalog.stats``, labels in ``catalog.labels``).

Bulk rows arrive as pyarrow tables and go in through DuckDB's Arrow scan
(``INSERT INTO t BY NAME SELECT ... FROM arrow_table``), never row by row: DuckDB reads the columns
directly, with no per-row Python work. Each table is registered on the writing connection for its
statements (:func:`scanned`), not found by DuckDB's replacement scan of Python variables: a server
with SQL over HTTP turns external access off, and that turns replacement scans off too.

Runs are atomic: each is visible whole or not at all. Several runs finished together (a batch's
micro-batch) are written by :func:`write_runs` in one transaction holding only whole runs (group
commit): on DuckDB 2.0 each INSERT statement and each commit has a fixed cost whatever its size, so
four statements for a whole group instead of four per run is what lets batch ingest keep up with the
model (README, Performance). A crash loses at most that uncommitted group, which a rerun recomputes.

Columnar batch schema (what ``ingest`` hands over):
- tokens: position int32, token_id int32, token string, is_generated bool, is_special bool, kept bool, proxy float64
- activations: position int32, sae_index int16 (index into the batch's SAE list), feature_id int32, act float32,
  and optionally attr float32 (a run with an attribution target; absent → NULL)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from catalog import schema
from catalog.db import Catalog
from catalog.errors import CatalogError
from catalog.runs import model_key


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
def transaction(catalog: Catalog, what: str = "this change") -> Iterator[duckdb.DuckDBPyConnection]:
    """One DuckDB transaction on a fresh cursor; rolled back whole on any error. On a read-only catalog,
    :class:`catalog.errors.CatalogReadOnly` naming ``what`` (callers refuse earlier, before their work)."""
    catalog.require_writable(what)
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


def model_key_of(con: duckdb.DuckDBPyConnection, model: ModelInfo, catalog: Catalog | None = None) -> int:
    """The catalog key of ``model`` (same id and weights fingerprint → same key), created if new.
    Inside a write transaction pass ``catalog``: keys committed before are then read from memory."""
    cache_key = ("model", model.model_id, model.fingerprint)
    if catalog is not None and cache_key in catalog.known_keys:
        return catalog.known_keys[cache_key]
    key = model_key(con, model.model_id, model.fingerprint)
    if key is None:
        key = int(con.execute(
            "INSERT INTO models (model_id, fingerprint, family, n_layers, d_model) VALUES (?, ?, ?, ?, ?) "
            "RETURNING model_key", [model.model_id, model.fingerprint, model.family, model.n_layers, model.d_model],
        ).fetchone()[0])
    if catalog is not None:
        catalog.pending_keys[cache_key] = key
    return key


def adopt_fingerprint(catalog: Catalog, model_id: str, fingerprint: str, legacy: str) -> bool:
    """A catalog that knows ``model_id`` only by the fingerprint earlier versions computed (``legacy``: it
    hashed the model folder's path and the transformers version) gives that row the new ``fingerprint``,
    so the model keeps its key: its calibrations, labels and batch backgrounds carry over, and its stored
    runs keep their ids (a request makes its run again once, under a path-free id). Nothing on a
    read-only catalog, or when the new fingerprint is already known; True when a row was re-keyed."""
    if not legacy or legacy == fingerprint or catalog.read_only:
        return False
    if model_key(catalog, model_id, fingerprint) is not None or model_key(catalog, model_id, legacy) is None:
        return False
    with transaction(catalog, "adopting a model fingerprint") as con:
        con.execute("UPDATE models SET fingerprint = ? WHERE model_key = (SELECT min(model_key) FROM models "
                    "WHERE model_id = ? AND fingerprint = ?) AND NOT EXISTS (SELECT 1 FROM models "
                    "WHERE model_id = ? AND fingerprint = ?)", [fingerprint, model_id, legacy, model_id, fingerprint])
    return True


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


@contextmanager
def scanned(con: duckdb.DuckDBPyConnection, **tables: pa.Table) -> Iterator[duckdb.DuckDBPyConnection]:
    """``con`` with each Arrow table readable by its name for the statements inside (registered on this
    connection only, unregistered after). An aborted transaction has already dropped them (its rollback
    undoes the registration), so a failed unregister must not hide the statement's own error."""
    for name, rows in tables.items():
        con.register(name, rows)
    try:
        yield con
    finally:
        for name in tables:
            with suppress(duckdb.Error):
                con.unregister(name)


def append_rows(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table, **keys: int) -> None:
    """Bulk-insert an Arrow table (columns by name) plus constant key columns, via DuckDB's Arrow scan."""
    constants = "".join(f"{int(value)}::INTEGER AS {name}, " for name, value in keys.items())
    with scanned(con, _arrow_rows=rows):
        con.execute(f"INSERT INTO {table} BY NAME SELECT {constants}* FROM _arrow_rows")


def with_sae_keys(acts: pa.Table, key_lists: list[np.ndarray], counts: list[int]) -> pa.Table:
    """Replace ``sae_index`` by the catalog's ``sae_key`` (a numpy take, no join). ``acts`` stacks the
    rows of several runs (``counts`` rows each), each run's index pointing into its own key list; the
    lists are laid end to end so one lookup serves them all."""
    index = acts.column("sae_index").to_numpy()
    if len(index) and (index >= np.repeat([len(k) for k in key_lists], counts)).any():
        raise CatalogError("activations", "an sae_index beyond its run's SAE list")
    offsets = np.repeat(np.cumsum([0, *[len(k) for k in key_lists[:-1]]]), counts).astype(np.int64)
    mapped = np.concatenate(key_lists).astype(np.int32)[offsets + index] if len(index) else np.zeros(0, np.int32)
    return acts.drop_columns(["sae_index"]).append_column("sae_key", pa.array(mapped, type=pa.int32()))


# -- runs -----------------------------------------------------------------------------------------

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
    with transaction(catalog, "storing new runs") as con:
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
    scans one large chunk faster than many small ones). Returns run_id → run_key."""
    rows, sae_key_maps = [], []
    for r in runs:
        sae_key_maps.append(np.asarray(sae_keys(con, r.saes, catalog), dtype=np.int32))
        fields = {**r.run, "model_key": model_key_of(con, r.model, catalog)}
        for name in ("layers", "streams", "restrict_features", "timings"):
            if not isinstance(fields.get(name), str):
                fields[name] = json.dumps(fields.get(name))
        rows.append(fields)
    names = dict.fromkeys(n for row in rows for n in row)  # as columns: cheaper than binding each value
    run_rows = pa.table({n: pa.array([row.get(n) for row in rows], _RUN_TYPES[n]) for n in names})
    with scanned(con, _arrow_rows=run_rows):
        created = dict(con.execute("INSERT INTO runs BY NAME SELECT * FROM _arrow_rows RETURNING run_id, run_key")
                       .fetchall())
    run_keys = [int(created[r.run["run_id"]]) for r in runs]
    append_rows(con, "run_saes", pa.table({"run_key": _repeat(run_keys, [len(m) for m in sae_key_maps]),
                                           "sae_key": pa.array(np.concatenate(sae_key_maps), pa.int32())}))
    tokens = pa.concat_tables([r.tokens for r in runs]).combine_chunks()
    append_rows(con, "tokens", tokens.append_column("run_key", _repeat(run_keys, [r.tokens.num_rows for r in runs])))
    # (runs with and without attributions share a micro-batch: a missing attr column is NULLs)
    acts = pa.concat_tables([r.activations for r in runs], promote_options="default").combine_chunks()
    counts = [r.activations.num_rows for r in runs]
    append_rows(con, "activations",
                with_sae_keys(acts, sae_key_maps, counts).append_column("run_key", _repeat(run_keys, counts)))
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


# -- tags, batch ids and first calibrations (small writes beside a run) ---------------------------

@dataclass(frozen=True)
class RunTags:
    """What a request says about its run beyond its identity: the batch/body ``id`` and ``tags``."""

    run_key: int
    batch_id: str | None
    tags: dict[str, str]


def tag_runs(catalog: Catalog, items: Sequence[RunTags]) -> None:
    """Merge tags into runs and set their batch ids, all in one small transaction (a run's tags are
    whole before and after). A key tagged again takes the new value; a later item wins over an earlier
    one for the same run."""
    items = [i for i in items if i.batch_id is not None or i.tags]
    if not items:
        return
    if catalog.read_only:  # issue 12, item 6: tags asked for are refused; batch ids (bookkeeping) are not kept
        if any(i.tags for i in items):
            catalog.require_writable("tagging runs")
        return
    tags = {(i.run_key, k): v for i in items for k, v in i.tags.items()}
    ids = {i.run_key: i.batch_id for i in items if i.batch_id is not None}
    with transaction(catalog) as con:
        if tags:
            tag_rows = pa.table({"run_key": pa.array([k for k, _ in tags], pa.int32()),
                                 "key": [key for _, key in tags], "value": list(tags.values())})
            with scanned(con, _tag_rows=tag_rows):
                con.execute("DELETE FROM run_tags t USING _tag_rows n WHERE t.run_key = n.run_key AND t.key = n.key")
                con.execute("INSERT INTO run_tags BY NAME SELECT * FROM _tag_rows")
        if ids:
            id_rows = pa.table({"run_key": pa.array(list(ids), pa.int32()), "batch_id": list(ids.values())})
            with scanned(con, _id_rows=id_rows):
                con.execute("DELETE FROM run_batch_ids b USING _id_rows n WHERE b.run_key = n.run_key")
                con.execute("INSERT INTO run_batch_ids BY NAME SELECT * FROM _id_rows")


def record_calibrations(catalog: Catalog, used: dict[int, dict[int, int | None]]) -> None:
    """Remember, per run (``run_key → {sae_key: calibration_id}``), the calibration of its first
    ranking; runs (and SAEs) already recorded keep theirs, uncalibrated SAEs are not recorded."""
    rows = [(r, k, c) for r, cals in used.items() for k, c in cals.items() if c is not None]
    if not rows or catalog.read_only:  # a read-only catalog answers without remembering (issue 12, item 6)
        return
    cal_rows = pa.table({"run_key": pa.array([r for r, _, _ in rows], pa.int32()),
                         "sae_key": pa.array([k for _, k, _ in rows], pa.int32()),
                         "calibration_id": pa.array([c for _, _, c in rows], pa.int32())})
    with transaction(catalog) as con, scanned(con, _cal_rows=cal_rows):
        con.execute("INSERT INTO run_calibrations BY NAME SELECT * FROM _cal_rows n WHERE NOT EXISTS "
                    "(SELECT 1 FROM run_calibrations c WHERE c.run_key = n.run_key AND c.sae_key = n.sae_key)")
