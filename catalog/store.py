"""The shared store: the catalog's tables as Delta Lake tables (``deltalake``) under one folder or URI,
written by many ingest workers at once and read through DuckDB under the catalog's own relation names.

Layout: ``<store>/<table>`` holds one Delta table per catalog table (same columns, see
:mod:`catalog.schema`), plus ``<store>/_key_ranges`` (the integer keys handed out, below). Every table
is created by the job's driver before any worker starts (two writers creating one table race:
``CommitFailedError``).

Commit order, so a run is visible whole or not at all: a chunk of runs is one Delta append per
table, children first (``run_saes``, ``tokens``, ``activations``, ``run_tags``, ``run_batch_ids``,
committed concurrently: appends to different tables are independent) and, once all of them are
committed, the ``runs`` rows last — the commit point. Each append carries the chunk's transaction marker
(``<job>:chunk-<i>``, Delta's ``app_transactions``) in the same atomic commit, so a retried or
resumed chunk skips each table it already committed, and a chunk is done once its ``runs`` append is.
Readers bind the child tables through ``runs`` (rows whose run_key has no ``runs`` row are not
seen) and load ``runs`` before the children, so any snapshot shows only whole runs.

Keys: the local catalog draws run_key/model_key/sae_key from sequences; the store has many writers,
so keys are handed out in ranges recorded in ``_key_ranges`` (:func:`reserve_keys`): a job's driver
registers its models/SAEs and reserves one run_key per prompt before fan-out, workers only use them.

Reading: :class:`StoreCatalog` is a catalog in memory, migrated like a file (so the public views and
the ranking SQL are the same text), whose base tables are replaced by views over a pinned snapshot of
each Delta table: DuckDB's own ``read_parquet`` over the snapshot's files where the store is on a
local disk and the table has few files (the store is append-only, so a version is exactly its list of
files), else ``DeltaTable(...).to_pyarrow_dataset()`` (Delta's file statistics skip files; DuckDB
pushes ``run_key`` filters into both scans).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from catalog import sandbox, schema, stats, writes
from catalog.db import Catalog
from catalog.errors import CatalogError, CatalogReadOnly

# the catalog's tables, all mirrored in the store (alembic's bookkeeping table is not)
STORE_TABLES = tuple(t.name for t in schema.metadata.sorted_tables)
# children of a run, committed before its ``runs`` row and read only through it
RUN_CHILDREN = ("run_saes", "tokens", "activations", "run_tags", "run_batch_ids", "run_calibrations")
CHUNK_COMMIT_ORDER = ("run_saes", "tokens", "activations", "run_tags", "run_batch_ids", "runs")
KEY_RANGES = "_key_ranges"
KEY_KINDS = {"run": ("runs", "run_key"), "model": ("models", "model_key"), "sae": ("saes", "sae_key"),
             "calibration": ("calibrations", "calibration_id")}
# children of a calibration, committed before its ``calibrations`` row and read only through it
CALIBRATION_CHILDREN = ("calibration_saes", "calibration_tokens", "calibration_activations", "feature_stats")
CALIBRATION_COMMIT_ORDER = (*CALIBRATION_CHILDREN, "labels", "calibrations")
MAX_RESERVE_TRIES = 20
ROW_GROUP_ROWS = 128 * 1024  # compaction: row groups small enough that a per-run read skips most of them
# a table with at most this many files is read by DuckDB's read_parquet (no Python in the scan, bound
# once for every cursor); more, and the Arrow dataset's file statistics skip files read_parquet opens
# (README, Performance: Store)
PARQUET_MAX_FILES = 32


def _arrow_type(column: sa.Column) -> pa.DataType:
    """The store's Arrow type of a catalog column (``Float`` is DuckDB's 4-byte FLOAT, ``Double`` 8 bytes)."""
    for sql_type, arrow in ((sa.BigInteger, pa.int64()), (sa.Integer, pa.int32()), (sa.Boolean, pa.bool_()),
                            (sa.Double, pa.float64()), (sa.Float, pa.float32()), (sa.DateTime, pa.timestamp("us")),
                            (sa.String, pa.string())):
        if isinstance(column.type, sql_type):
            return arrow
    raise TypeError(f"no Arrow type for {column.name}: {column.type}")


def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema of ``table`` in the store (every column nullable, as Delta's are)."""
    if table == KEY_RANGES:
        return pa.schema([("kind", pa.string()), ("first", pa.int64()), ("count", pa.int64()), ("job", pa.string()),
                          ("token", pa.string())])
    return pa.schema([(c.name, _arrow_type(c)) for c in schema.metadata.tables[table].columns])


def conform(table: str, rows: pa.Table) -> pa.Table:
    """``rows`` with exactly ``table``'s columns, in order and type (absent columns as nulls)."""
    target = arrow_schema(table)
    cols = [rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
            for f in target]
    return pa.Table.from_arrays(cols, schema=target)


def table_uri(store: str, table: str) -> str:
    return f"{str(store).rstrip('/')}/{table}"


def create_tables(store: str) -> None:
    """Create every table of the store that is missing (the driver, before fan-out)."""
    if "://" not in str(store):
        Path(store).mkdir(parents=True, exist_ok=True)
    for table in (*STORE_TABLES, KEY_RANGES):
        uri = table_uri(store, table)
        try:
            DeltaTable.create(uri, schema=arrow_schema(table), mode="ignore")
        except CommitFailedError:  # another driver created it at the same moment: the table is there
            if not DeltaTable.is_deltatable(uri):
                raise


_LIVE: dict[str, DeltaTable] = {}  # this process's open tables, by URI (a writer's: see live_table)
_LIVE_LOCK = threading.Lock()


def live_table(uri: str) -> DeltaTable:
    """The table at ``uri`` at its latest version, kept open across calls in this process and brought up
    to date incrementally (only log entries newer than the last call are read): opening a table replays
    its log since the last checkpoint, which a writer committing chunk after chunk would pay per append.
    One thread at a time per table (a chunk commits each table from one thread)."""
    with _LIVE_LOCK:
        table = _LIVE.get(uri)
        if table is None:
            _LIVE[uri] = table = DeltaTable(uri)
            return table
    table.update_incremental()
    return table


def open_table(store: str, table: str, version: int | None = None) -> DeltaTable:
    """One table of the store (at ``version``); :class:`CatalogError` naming ``store`` when it is not there."""
    try:
        return DeltaTable(table_uri(store, table), version=version)
    except TableNotFoundError as exc:
        raise CatalogError("store", f"{store} is not a sae-discover store (no Delta table {table}); "
                                    "create it with python -m sae_discover ingest --store") from exc


# -- writes -----------------------------------------------------------------------------------------

def append(store: str, table: str, rows: pa.Table, marker: str | None = None, metadata: Mapping[str, str] | None = None
           ) -> bool:
    """Append ``rows`` to ``table`` in one commit, carrying ``marker`` (an idempotent transaction id)
    when given; a marker the table already holds means this append was committed before: skipped
    (returns False)."""
    delta = live_table(table_uri(store, table))
    if marker is not None and delta.transaction_version(marker) is not None:
        return False
    props = CommitProperties(app_transactions=[Transaction(marker, 0)] if marker else None,
                             custom_metadata=dict(metadata) if metadata else None)
    # merge: a column a later catalog revision added (labels.calibration_id) joins a table an older
    # version created; conform gives the rows exactly the catalog's columns
    write_deltalake(delta, conform(table, rows) if table != KEY_RANGES else rows, mode="append",
                    schema_mode="merge", commit_properties=props)
    return True


def chunk_done(store: str, marker: str, point: str = "runs") -> bool:
    """Whether the chunk ``marker`` is committed (its append to ``point``, the commit point, is)."""
    return live_table(table_uri(store, point)).transaction_version(marker) is not None


def commit_chunk(store: str, marker: str, tables: Mapping[str, pa.Table], order: tuple[str, ...] = CHUNK_COMMIT_ORDER,
                 before_point: Callable[[], object] | None = None) -> bool:
    """Commit one chunk: one append per table in ``order``, each with ``marker``, the last (``runs`` for
    runs) only once every other is committed — the commit point. The others are committed concurrently
    (one thread per table: a commit is mostly waiting on the file system); tables a killed attempt
    already committed are skipped. ``before_point()`` is called between the two (a test hook: see
    :func:`sae_discover.distributed.pause_point`). Returns False when the whole chunk was committed before."""
    point = order[-1]
    if chunk_done(store, marker, point):
        return False
    children = [t for t in order[:-1] if t in tables and tables[t].num_rows]
    if children:
        with ThreadPoolExecutor(len(children)) as pool:  # leaving the block waits for every child commit
            for _ in pool.map(lambda t: append(store, t, tables[t], marker), children):
                pass  # an append's error is raised here, before the commit point
    if before_point is not None:
        before_point()
    rows = tables.get(point)
    if rows is None or rows.num_rows == 0:  # nothing new (e.g. stored by another job): still mark the chunk done
        rows = arrow_schema(point).empty_table()
    append(store, point, rows, marker)
    return True


def reserve_keys(store: str, kind: str, count: int, job: str) -> int:
    """Reserve ``count`` consecutive keys of ``kind`` (run, model, sae) for ``job``; returns the first.

    The rule: a reservation is an append to ``_key_ranges``; it holds when no range committed at an
    earlier version overlaps it. The driver picks keys above every range of the version it read, so
    only ranges committed between that version and its own commit (found by a unique token in the
    commit's metadata, among the newest commits only) can overlap: none, the usual case, and nothing
    more is read; else it reads the table as it was just before its commit, and on an overlap
    (another driver reserved the same keys first) reserves again above everything seen. Appends never
    conflict in Delta, so reservations are lock-free; keys lost to a retried reservation are simply
    never used."""
    if count <= 0:
        return 0
    uri = table_uri(store, KEY_RANGES)
    for _ in range(MAX_RESERVE_TRIES):
        delta = live_table(uri)
        seen, ranges = delta.version(), delta.to_pyarrow_table()
        first = _next_free(store, kind, ranges)
        token = uuid.uuid4().hex
        rows = pa.table({"kind": [kind], "first": pa.array([first], pa.int64()), "count": pa.array([count], pa.int64()),
                         "job": [job], "token": [token]}, schema=arrow_schema(KEY_RANGES))
        append(store, KEY_RANGES, rows, metadata={"reservation": token})
        version = _commit_version(live_table(uri), token, seen)
        if version == seen + 1 or version == 0:  # nothing committed between the version read and this one
            return first
        if not _overlaps(DeltaTable(uri, version=version - 1).to_pyarrow_table(), kind, first, count):
            return first
    raise CatalogError("store", f"could not reserve {kind} keys after {MAX_RESERVE_TRIES} tries (too many drivers at once)")


def _next_free(store: str, kind: str, ranges: pa.Table) -> int:
    """One past every key of ``kind`` reserved or stored (keys start at 1, as the local sequences do)."""
    mine = ranges.filter(pc.equal(ranges["kind"], kind))
    top = 0
    if mine.num_rows:
        top = pc.max(pc.add(pc.subtract(mine["first"], 1), mine["count"])).as_py()
    table, column = KEY_KINDS[kind]
    return max(top, _stored_max(table_uri(store, table), column)) + 1


def _stored_max(uri: str, column: str) -> int:
    """The largest ``column`` stored in the table at ``uri`` (0 when empty), from the per-file maxima in
    the Delta log; the column itself is read only when a file has no statistics."""
    delta = live_table(uri)
    files = pa.table(delta.get_add_actions(flatten=True))
    files, stat = files.filter(pc.greater(files["num_records"], 0)), f"max.{column}"
    if files.num_rows == 0:
        return 0
    if stat in files.column_names and files[stat].null_count == 0:
        return int(pc.max(files[stat]).as_py())
    return int(pc.max(delta.to_pyarrow_table(columns=[column])[column]).as_py() or 0)


def _commit_version(table: DeltaTable, token: str, after: int) -> int:
    """The version of the reservation commit carrying ``token``: one of the commits after version ``after``."""
    for entry in table.history(max(table.version() - after, 1)):
        if entry.get("reservation") == token:
            return int(entry["version"])
    raise CatalogError("store", "a key reservation's commit is missing from the table history")


def _overlaps(ranges: pa.Table, kind: str, first: int, count: int) -> bool:
    return any(r["kind"] == kind and r["first"] < first + count and first < r["first"] + r["count"]
               for r in ranges.to_pylist())


def find_keys(store: str, table: str, key: str, match: Iterable[str], wanted: Iterable[tuple]) -> dict[tuple, int]:
    """Keys of the rows of ``table`` whose ``match`` columns equal one of ``wanted`` (the lowest key per identity)."""
    match, wanted = list(match), set(wanted)
    if not wanted:
        return {}
    # filtered in the scan on the first column (Delta's file statistics skip files), checked whole below
    first = pc.field(match[0]).isin(list({w[0] for w in wanted}))
    rows = open_table(store, table).to_pyarrow_dataset().to_table(columns=[key, *match], filter=first).to_pylist()
    found: dict[tuple, int] = {}
    for r in sorted(rows, key=lambda r: r[key]):
        ident = tuple(r[m] for m in match)
        if ident in wanted:
            found.setdefault(ident, r[key])
    return found


# -- reads: a pinned snapshot bound under the catalog's names ----------------------------------------

class StoreCatalog(Catalog):
    """A read-only catalog over a pinned snapshot of a store: the catalog's schema (views, and whatever
    the migrations define) in memory, each base table replaced by a view over its Delta snapshot.

    ``runs`` is pinned first and the other tables after it, so every child row of a visible run is in
    the snapshot; child tables are read through ``runs``, so rows of chunks still being committed are
    not seen (calibrations likewise). ``versions`` records the pinned version of each table; ``runs_version`` pins ``runs`` at
    an older version (what a reader that opened then sees).

    How a table is bound: on a local store, a table of at most :data:`PARQUET_MAX_FILES` files is a view
    over ``read_parquet`` of the version's files (the store is append-only and its tables use no
    deletion vectors or column mapping, :func:`_plain_files`, so those files are exactly the version's
    rows), defined once in the database: every cursor sees it, nothing is registered per cursor, and the
    directory is allowed for the sandbox's locked-down connections. Other tables (many small files, or
    a remote store DuckDB cannot open without extensions) are Arrow datasets registered on each cursor."""

    def __init__(self, store: str, runs_version: int | None = None) -> None:
        super().__init__(":memory:")
        self.store = str(store)
        self.versions: dict[str, int] = {}
        self._datasets: dict[str, object] = {}  # registered on every cursor (raw)
        files: dict[str, list[str]] = {}  # bound by read_parquet
        parents = ("runs", "calibrations")  # pinned first: the commit points
        for table in (*parents, *(t for t in STORE_TABLES if t not in parents)):
            delta = open_table(self.store, table, runs_version if table == "runs" else None)
            self.versions[table] = delta.version()
            uris = delta.file_uris()
            if _on_local_disk(self.store) and len(uris) <= PARQUET_MAX_FILES and _plain_files(delta):
                files[table] = uris
            else:
                self._datasets[f"_store_{table}"] = delta.to_pyarrow_dataset()
        con = self.raw()
        try:
            if files:  # the store's folder, as given and with links resolved (as the file list may name it)
                folder = self.store.removeprefix("file://")
                allowed = {os.path.abspath(folder) + "/", os.path.realpath(folder) + "/"}
                con.execute(f"SET allowed_directories = [{', '.join(map(_literal, sorted(allowed)))}]")
            for table, uris in files.items():
                con.execute(_parquet_relation(table, uris))
            canon = _canonical_keys(con)
            for table in STORE_TABLES:
                held = {row[0] for row in con.execute(f"DESCRIBE _store_{table}").fetchall()}  # its snapshot's columns
                missing = [(name, kind) for name, kind, *_ in con.execute(f"DESCRIBE {table}").fetchall()
                           if name not in held]  # the catalog's columns (and types) the snapshot lacks
                con.execute(f"DROP TABLE {table} CASCADE")
                con.execute(f"CREATE VIEW {table} AS {_bound(table, missing, canon)}")
        finally:
            con.close()
        self.read_only, self.read_only_reason = True, f"a snapshot of the store {self.store}"
        self.path = self.store

    def require_writable(self, what: str) -> None:
        """Refuse ``what``: a snapshot is read-only (the store is written by ``ingest --store`` and
        ``calibrate --store``, whose commits a reader opened later sees); the error names ``store``."""
        raise CatalogReadOnly("store", f"{self.store} is read here as a pinned snapshot (runs version "
                                       f"{self.versions['runs']}): {what} needs to write to it; write to a store with "
                                       "python -m sae_discover ingest --store (or calibrate --store)")

    def raw(self) -> duckdb.DuckDBPyConnection:
        """A new cursor with the snapshot's Arrow datasets registered (a registration belongs to one connection)."""
        con = super().raw()
        for name, dataset in self._datasets.items():
            con.register(name, dataset)
        return con


def _on_local_disk(store: str) -> bool:
    """Whether the store is a folder on a local file system (DuckDB reads it without extensions)."""
    return "://" not in store or store.startswith("file://")


def _plain_files(delta: DeltaTable) -> bool:
    """Whether the table's rows are exactly its files' rows: no reader feature beyond ``timestampNtz``
    (deletion vectors or column mapping would change what a file means)."""
    protocol = delta.protocol()
    return protocol.min_reader_version == 1 or (protocol.min_reader_version == 3
                                                and set(protocol.reader_features or ()) <= {"timestampNtz"})


def _parquet_relation(table: str, files: list[str]) -> str:
    """``_store_<table>``: a view over the files of a pinned version, or, with no files, an empty table
    with the catalog's columns."""
    if not files:
        return f"CREATE TABLE _store_{table} AS SELECT * FROM {table} LIMIT 0"
    # by name: files written before a later revision added a column lack it (NULL there)
    return (f"CREATE VIEW _store_{table} AS SELECT * FROM read_parquet([{', '.join(map(_literal, files))}], "
            "union_by_name = true)")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# what identifies a model, an SAE and a run: two drivers that registered the same new model (or SAE)
# at the same moment gave it two keys, and two concurrent jobs may both have stored a run (README, Store)
IDENTITIES = {"model_key": ("models", ("model_id", "fingerprint")),
              "sae_key": ("saes", ("sae_id", "layer", "stream", "fingerprint")),
              "run_key": ("runs", ("run_id",))}


def _canonical_keys(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """For each key whose identity holds several keys in the snapshot, a table ``_canon_<key>`` (key →
    the identity's smallest key, the first committed) that the views read through, so each model, SAE
    and run is seen once; keys without duplicates (the usual case) are left as they are. Returns the
    key columns that have such a table."""
    canon = {}
    for key, (table, identity) in IDENTITIES.items():
        cols = ", ".join(identity)
        (extra,) = con.execute(f"SELECT count(*) - count(DISTINCT ({cols})) FROM _store_{table}").fetchone()
        if extra:
            con.execute(f"CREATE TABLE _canon_{key} AS SELECT {key} AS key, min({key}) OVER (PARTITION BY {cols}) "
                        f"AS canon FROM _store_{table}")
            canon[key] = f"_canon_{key}"
    return canon


def _bound(table: str, missing: list[tuple[str, str]], canon: Mapping[str, str] | None = None) -> str:
    """The view that stands for ``table``: its snapshot, children only through a visible run or
    calibration; a column the snapshot lacks (``missing``: name and DuckDB type; a table written before
    a later revision added the column) reads as NULL. ``canon`` (:func:`_canonical_keys`): a model,
    SAE or run registered twice is seen once, by its first key — its table keeps that row, other
    tables read the first key for the model and SAE keys, and the children of a run's later copy are
    left out."""
    canon = canon or {}
    rows = f"SELECT *{''.join(f', NULL::{kind} AS {name}' for name, kind in missing)} FROM _store_{table}"
    columns = set(schema.metadata.tables[table].columns.keys())
    owned = next((key for key, (owner, _) in IDENTITIES.items() if owner == table), None)
    where = []
    if owned in canon:
        where.append(f"{owned} IN (SELECT canon FROM {canon[owned]})")
    if table in RUN_CHILDREN:
        visible = f"canon FROM {canon['run_key']}" if "run_key" in canon else "run_key FROM _store_runs"
        where.append(f"run_key IN (SELECT {visible})")
    if table in CALIBRATION_CHILDREN:
        where.append("calibration_id IN (SELECT calibration_id FROM _store_calibrations)")
    if where:
        rows = f"{rows} WHERE {' AND '.join(where)}"
    mapped = [key for key in ("model_key", "sae_key") if key in canon and key in columns and key != owned]
    if not mapped:
        return rows
    replace = ", ".join(f"coalesce(c_{key}.canon, t.{key}) AS {key}" for key in mapped)
    joins = " ".join(f"LEFT JOIN {canon[key]} c_{key} ON c_{key}.key = t.{key}" for key in mapped)
    return f"SELECT t.* REPLACE ({replace}) FROM ({rows}) t {joins}"


# -- maintenance ---------------------------------------------------------------------------------------

def compact(store: str, vacuum_hours: int = 0) -> dict[str, dict]:
    """Compact each table's small files into larger ones (row groups of :data:`ROW_GROUP_ROWS`, ZSTD;
    compaction keeps the rows of a file in their order, so run-ordered appends stay run-ordered), then
    vacuum files no version newer than ``vacuum_hours`` needs, and empty staging files a killed writer
    left (``*.parquet#N``, which vacuum does not list). Returns per table what was done."""
    props = WriterProperties(compression="ZSTD", max_row_group_size=ROW_GROUP_ROWS)
    done = {}
    for table in STORE_TABLES:
        delta = open_table(store, table)
        metrics = delta.optimize.compact(writer_properties=props)
        removed = delta.vacuum(retention_hours=vacuum_hours, enforce_retention_duration=False, dry_run=False)
        done[table] = {"files_added": metrics.get("numFilesAdded", 0), "files_removed": metrics.get("numFilesRemoved", 0),
                       "vacuumed": len(removed) + _remove_staging(store, table)}
    return done


def _remove_staging(store: str, table: str) -> int:
    """Empty staging files (``*.parquet#N``) a writer killed mid-commit left, on a local store."""
    if "://" in store and not store.startswith("file://"):
        return 0
    folder = Path(table_uri(store.removeprefix("file://"), table))
    n = 0
    for path in folder.glob("*.parquet#*"):
        with contextlib.suppress(OSError):
            path.unlink()
            n += 1
    return n


# -- import into a local catalog ---------------------------------------------------------------------

IMPORT_BATCH = 64  # runs per local transaction (group commit, as batch ingest)


def select_runs(snapshot: StoreCatalog, where: str | None = None) -> list[int]:
    """The run keys of the snapshot's ``v_runs`` rows matching the filter ``where`` (all without one), in
    key order: what :func:`import_store` copies, chosen (and the filter checked) before a local file opens."""
    con = snapshot.raw()
    try:
        listing = con.sql("SELECT * FROM v_runs ORDER BY run_key").to_arrow_table()
    finally:
        con.close()
    return sandbox.filter_rows(listing, "v_runs", where, "where", "run_key") if where else listing["run_key"].to_pylist()


def import_store(snapshot: StoreCatalog, local: Catalog, keys: list[int]) -> dict[str, int]:
    """Copy the snapshot's runs ``keys`` (:func:`select_runs`) into the local catalog through its own write
    path: each group of runs whole in one transaction, local keys drawn from the local sequences, runs
    already there (same run_id) kept. Tags and batch ids come along."""
    con = snapshot.raw()
    try:
        created = 0
        for start in range(0, len(keys), IMPORT_BATCH):
            part = keys[start:start + IMPORT_BATCH]
            written = writes.write_runs(local, [_run_rows(con, key) for key in part])
            created += sum(made for _, made in written)
            _import_tags(con, local, dict(zip(part, (k for k, _ in written), strict=True)))
    finally:
        con.close()
    return {"runs": len(keys), "created": created}


def _run_rows(con: duckdb.DuckDBPyConnection, run_key: int) -> writes.RunRows:
    """One stored run as ingest hands runs to the catalog (activations carry each SAE's index in the run's list)."""
    cur = con.execute("SELECT * FROM runs WHERE run_key = ?", [run_key])
    run = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
    model = con.execute("SELECT model_id, fingerprint, family, n_layers, d_model FROM models WHERE model_key = ?",
                        [run.pop("model_key")]).fetchone()
    saes = [writes.SAEInfo(*row) for row in con.execute(
        "SELECT s.sae_id, s.layer, s.stream, s.fingerprint, s.hook_name, s.architecture, s.d_in, s.d_sae "
        "FROM run_saes rs JOIN saes s USING (sae_key) WHERE rs.run_key = ? ORDER BY s.layer, s.stream, s.sae_key",
        [run_key]).fetchall()]
    tokens = con.sql("SELECT * EXCLUDE (run_key) FROM tokens WHERE run_key = $1 ORDER BY position",
                     params=[run_key]).to_arrow_table()
    acts = con.sql(
        "SELECT a.position, (i.idx - 1)::SMALLINT AS sae_index, a.feature_id, a.act, a.attr FROM activations a "
        "JOIN (SELECT rs.sae_key, row_number() OVER (ORDER BY s.layer, s.stream, s.sae_key) AS idx "
        "      FROM run_saes rs JOIN saes s USING (sae_key) WHERE rs.run_key = $1) i USING (sae_key) "
        "WHERE a.run_key = $1 ORDER BY i.idx, a.position, a.feature_id", params=[run_key]).to_arrow_table()
    for name in ("run_key", "created_at"):
        run.pop(name)
    return writes.RunRows(run, writes.ModelInfo(*model), saes, tokens, acts)


def _import_tags(con: duckdb.DuckDBPyConnection, local: Catalog, key_map: dict[int, int]) -> None:
    """The tags and batch ids of the imported runs (store key → local key), merged into the local ones."""
    keys = list(key_map)
    ids = dict(con.execute("SELECT run_key, batch_id FROM run_batch_ids WHERE list_contains(?, run_key)", [keys]).fetchall())
    tags: dict[int, dict[str, str]] = {}
    for key, name, value in con.execute("SELECT run_key, key, value FROM run_tags WHERE list_contains(?, run_key)",
                                        [keys]).fetchall():
        tags.setdefault(key, {})[name] = value
    writes.tag_runs(local, [writes.RunTags(key_map[k], ids.get(k), tags.get(k, {})) for k in keys])


# -- calibrations ------------------------------------------------------------------------------------
# A calibration into a store: workers commit the codes of corpus chunks (CORPUS_CHUNK_ORDER, with the
# calibration_id the driver reserved), the driver then computes the statistics in SQL over the store
# (calibration_statistics) and commits them with the calibration's SAEs and lite labels, ``calibrations``
# last (commit_calibration): until then readers see none of it.

CORPUS_CHUNK_ORDER = ("calibration_tokens", "calibration_activations")  # activations: a corpus chunk's commit point


def calibration_statistics(store: str, calibration_id: int, saes: Iterable[tuple[int, int]], top: int = 5
                           ) -> tuple[int, pa.Table, dict[int, dict[int, list[str]]]]:
    """The statistics of a calibration whose codes are committed (its ``calibrations`` row not yet), by
    the local catalog's SQL (:data:`catalog.stats.FEATURE_STATS_SELECT`, :data:`catalog.stats.LITE_FIRES_SQL`)
    run by DuckDB over the store's calibration tables (scans filtered to this calibration and SAE).
    ``saes``: (sae_key, d_sae). Returns the corpus tokens, the feature_stats rows, and per sae_key the
    tokens each feature fires on most."""
    con = duckdb.connect()
    try:
        for table in CORPUS_CHUNK_ORDER:
            con.register(table, open_table(store, table).to_pyarrow_dataset())
        ((n_tokens,),) = con.execute("SELECT count(*) FROM calibration_tokens WHERE calibration_id = ?",
                                     [calibration_id]).fetchall()
        if n_tokens == 0:
            raise CatalogError("corpus", "the calibration corpus produced no tokens")
        parts, fires = [], {}
        for key, d_sae in saes:
            parts.append(con.sql(stats.FEATURE_STATS_SELECT,
                                 params=stats.feature_stats_params(calibration_id, key, n_tokens, d_sae)).to_arrow_table())
            fires[key] = dict(con.execute(stats.LITE_FIRES_SQL, {"cal": calibration_id, "sae": key, "top": top}).fetchall())
    finally:
        con.close()
    return n_tokens, pa.concat_tables(parts), fires


def commit_calibration(store: str, marker: str, tables: Mapping[str, pa.Table]) -> None:
    """Commit a calibration's statistics, SAEs and labels, then its ``calibrations`` row (the commit
    point); each append carries ``marker``, so a resumed driver skips what it committed."""
    for table in CALIBRATION_COMMIT_ORDER:
        if table in tables and tables[table].num_rows:
            append(store, table, tables[table], marker)
