"""User-written SQL — the ``sql`` command, ``POST /v1/sql`` and the drift run filters — on a locked-down connection.

Every connection that runs user SQL is made by :func:`lock_down`: external access off (no COPY TO, no
``read_csv``/``read_text``/``glob`` of arbitrary paths, no extension loading, no scans of Python
variables), a memory limit, and then its configuration locked, so a statement cannot switch any of that
back. Every query runs through :func:`run_query`, the one guard for the CLI and the API:

- its statements are parsed (DuckDB's own parser) and each must be a query (SELECT, and DESCRIBE, SHOW,
  SUMMARIZE, FROM, VALUES, which DuckDB parses as SELECT), EXPLAIN or SET (with the configuration
  locked, only the connection's own variables: ``SET VARIABLE``, ``USE``); writes, COPY, ATTACH,
  INSTALL/LOAD, PRAGMA, CALL, transactions and the rest are refused before any statement runs;
- they run inside one ``BEGIN TRANSACTION READ ONLY`` that is always rolled back: a write that hides in
  a query (``nextval()``) is refused by DuckDB, and the query sees one consistent snapshot;
- under a time limit (:func:`limited`: a timer interrupts the connection, which stops that query only),
  and with at most ``max_rows`` rows and about ``max_bytes`` of values fetched (DuckDB streams the result:
  the rest is never computed).

Where the connection comes from is the only difference. The ``sql`` command opens the catalog file
read-only in a process of its own (:func:`open_user_sql`; :func:`cap_process_memory` also caps what
DuckDB allocates outside its buffer manager). The server holds its catalog read-write, and DuckDB 2.0
refuses a second connection to that file with another configuration in the same process (and other
processes are locked out), so with ``serve --enable_sql`` the server locks down its own database once,
right after opening it (external access, memory limit and configuration are settings of the whole
database), and each request runs on a new cursor of it. The catalog's own writes register their Arrow
tables explicitly (``catalog.writes.scanned``) and so keep working. A drift filter is parsed as one
expression (never spliced into a statement) and evaluated on an in-memory copy of the ``v_runs`` rows,
so it can see no other table, no file and no sequence. Errors come back as :class:`CatalogError`
naming the user's field (``query``, a filter's field, ``memory_limit``, ``timeout_s``, ``db``) or
:class:`CatalogLocked`.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from catalog.db import default_path, open_error, schema_upgradable
from catalog.errors import CatalogError

DEFAULT_MEMORY_LIMIT = "2GB"
DEFAULT_TIMEOUT_S = 60.0
MEMORY_LIMIT = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)

# statement kinds that change a database or touch files: on a read-only connection they fail, and the
# user is told that writes are refused (decided from the parsed statement, not from DuckDB's message)
WRITE_STATEMENTS = frozenset({
    duckdb.StatementType.INSERT, duckdb.StatementType.UPDATE, duckdb.StatementType.DELETE,
    duckdb.StatementType.MERGE_INTO, duckdb.StatementType.CREATE, duckdb.StatementType.CREATE_FUNC,
    duckdb.StatementType.DROP, duckdb.StatementType.ALTER, duckdb.StatementType.COPY,
    duckdb.StatementType.COPY_DATABASE, duckdb.StatementType.EXPORT, duckdb.StatementType.ATTACH,
    duckdb.StatementType.DETACH, duckdb.StatementType.VACUUM, duckdb.StatementType.ANALYZE,
    duckdb.StatementType.LOAD, duckdb.StatementType.EXTENSION,
})

# functions a run filter may not call: they read the process's settings, variables or environment,
# which a condition on a run's columns has no use for (and which would leak through the match)
FILTER_REFUSED_FUNCTIONS = frozenset({
    "current_setting", "getenv", "getvariable", "current_database", "current_catalog", "current_schema",
    "current_schemas", "current_user", "session_user", "user", "current_role", "which_secret", "version",
})
FILTER_REFUSED_PREFIXES = ("duckdb_", "pragma_")

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """The resources one piece of user SQL may use: DuckDB's memory limit and a wall-clock limit."""

    memory_limit: str = DEFAULT_MEMORY_LIMIT
    timeout_s: float = DEFAULT_TIMEOUT_S
    # what raises each limit, for the error that says it was reached (the sql command's flags by default)
    memory_hint: str = "--memory_limit"
    timeout_hint: str = "--timeout_s"

    def __post_init__(self) -> None:
        if not isinstance(self.memory_limit, str) or not MEMORY_LIMIT.match(self.memory_limit):
            raise CatalogError("memory_limit", f"expected a size such as '2GB' or '512MiB', got {self.memory_limit!r}")
        if not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s <= 86_400:
            raise CatalogError("timeout_s", f"expected seconds in (0, 86400], got {self.timeout_s!r}")


UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(size: str) -> int:
    """A DuckDB size (``2GB``, ``512MiB``; matched by ``MEMORY_LIMIT``) in bytes."""
    number, unit = re.match(r"\s*([\d.]+)\s*(\w+)", size).groups()  # type: ignore[union-attr]
    return int(float(number) * UNITS[unit.lower()])


# address space reserved beyond the cap's share for the query: thread stacks and malloc arenas (the
# time limit's timer thread, DuckDB's workers) reserve far more than they touch
ADDRESS_HEADROOM = 256 << 20


def cap_process_memory(limits: Limits) -> None:
    """Cap this process's address space at what it uses now plus twice the memory limit plus
    :data:`ADDRESS_HEADROOM` (Linux); called once the catalog is open, so what DuckDB reserves for
    itself (its worker threads) is in "what it uses now".

    DuckDB's memory limit governs its buffer manager, not every allocation (a ``repeat()`` of a
    billion characters, the Python rows of a huge result); the cap makes those fail as out of memory
    instead of taking the machine's. Only for a process that does nothing else (the ``sql`` command):
    a server or a model must not be capped by one user query.
    """
    try:
        import resource  # POSIX only: elsewhere the DuckDB limit alone applies
        with open("/proc/self/status") as status:
            used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        return
    cap = used + 2 * size_bytes(limits.memory_limit) + ADDRESS_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _reason(exc: BaseException) -> str:
    """A DuckDB error's message on one line, without the echo of the query that follows it (``LINE 1:``
    and a caret): a message spanning lines (an extension that cannot be loaded says why on its second,
    a missing table suggests another) keeps all of them."""
    lines = []
    for line in str(exc).strip().splitlines():
        if line.startswith(("LINE ", "Possible solutions:")):  # the query's echo, DuckDB's tuning advice
            break
        lines.append(line.strip())
    return " ".join(line for line in lines if line) or type(exc).__name__


def lock_down(con: duckdb.DuckDBPyConnection, limits: Limits) -> duckdb.DuckDBPyConnection:
    """Turn external access off, set the memory limit, then lock the configuration of ``con``: the one
    definition of what a connection for user SQL may do."""
    con.execute("SET enable_external_access = false")
    con.execute(f"SET memory_limit = '{limits.memory_limit.strip()}'")  # matched MEMORY_LIMIT: digits and a unit
    con.execute("SET lock_configuration = true")
    return con


def limited(con: duckdb.DuckDBPyConnection, limits: Limits, field: str, work: Callable[[], T]) -> T:
    """``work()`` (statements on ``con``) interrupted after ``limits.timeout_s``; DuckDB errors become
    one-line :class:`CatalogError` naming ``field``."""
    timer = threading.Timer(limits.timeout_s, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        return work()
    except duckdb.InterruptException as exc:
        raise CatalogError(field, f"stopped after the time limit of {limits.timeout_s:g} s "
                                  f"(raise it with {limits.timeout_hint})") from exc
    except (duckdb.OutOfMemoryException, MemoryError) as exc:
        raise CatalogError(field, f"needs more than the memory limit of {limits.memory_limit} "
                                  f"(raise it with {limits.memory_hint}): {_reason(exc)}") from exc
    finally:
        timer.cancel()


def open_user_sql(path: str | Path | None, limits: Limits | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only, locked-down DuckDB connection to the catalog at ``path`` (None: the default catalog)
    for the ``sql`` command. Raises :class:`CatalogError` (``db``) for a missing or unusable file and
    :class:`CatalogLocked` when another process holds it for writing."""
    limits = limits or Limits()
    path = str(path or default_path())
    if not Path(path).exists():
        raise CatalogError("db", f"{path} does not exist")
    try:
        con = duckdb.connect(path, read_only=True, config={"enable_external_access": False})
    except duckdb.Error as exc:
        error = open_error(path, True, exc, f"catalog {path} is held by another process for writing; query it "
                                            f"through that process or stop it ({_reason(exc)})")
        raise (error or CatalogError("db", f"{path} cannot be opened for queries: {_reason(exc)}")) from exc
    return lock_down(con, limits)


def _statements(con: duckdb.DuckDBPyConnection, query: str) -> list:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise CatalogError("query", _reason(exc)) from exc
    if not statements:
        raise CatalogError("query", "expected a SQL statement (the query is empty or only comments)")
    return statements


# the statements user SQL may run (see the module's docstring); every other kind is refused before any runs
ALLOWED_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.SET})


@dataclass(frozen=True)
class QueryResult:
    """The last statement's result: column names and DuckDB type names (None and [] when it returns no
    result set), its rows (at most ``max_rows``, within about ``max_bytes``), and which cap, if any,
    left rows unread (``"rows"`` or ``"bytes"``)."""

    columns: list[str] | None
    types: list[str]
    rows: list[tuple]
    truncated_by: str | None = None

    @property
    def truncated(self) -> bool:
        return self.truncated_by is not None


def check_statement(statement: duckdb.Statement) -> None:
    """Refuse a statement that is not a query, EXPLAIN or SET (decided from the parsed statement)."""
    kind = statement.type
    if kind in ALLOWED_STATEMENTS:
        return
    if kind in WRITE_STATEMENTS:
        raise CatalogError("query", f"write statements are refused ({kind.name}): SQL over the catalog is read-only")
    if kind == duckdb.StatementType.TRANSACTION:
        raise CatalogError("query", "transaction statements are refused: each query runs in its own read-only "
                                    "transaction")
    raise CatalogError("query", f"{kind.name} statements are refused: only queries (SELECT, DESCRIBE, SHOW, "
                                "SUMMARIZE), EXPLAIN and SET VARIABLE run")


def _execute(con: duckdb.DuckDBPyConnection, statement: duckdb.Statement) -> None:
    try:
        con.execute(statement)
    except (duckdb.InterruptException, duckdb.OutOfMemoryException):
        raise
    except duckdb.Error as exc:
        raise CatalogError("query", _reason(exc)) from exc


FETCH_CHUNK = 1024  # rows fetched at a time while the byte cap is watched


def value_bytes(value: Any) -> int:
    """About what ``value`` takes in a JSON answer (more than in CSV): text as JSON writes it in UTF-8
    (a control character escaped takes 6 bytes, ``é`` 2), a blob as its text, 8 for any other scalar,
    the sum over a list's or struct's members."""
    if isinstance(value, str):
        return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return len(str(value))
    if isinstance(value, list | tuple):
        return 8 + sum(value_bytes(v) for v in value)
    if isinstance(value, dict):
        return 8 + sum(value_bytes(k) + value_bytes(v) for k, v in value.items())
    return 8


def _fetch(con: duckdb.DuckDBPyConnection, max_rows: int | None, max_bytes: int | None) -> QueryResult:
    """At most ``max_rows`` rows, stopping before the row that would take the rows past ``max_bytes`` (a
    first row larger than that is refused: there is nothing smaller to send)."""
    if con.description is None:
        return QueryResult(None, [], [])
    columns, types = [d[0] for d in con.description], [str(d[1]) for d in con.description]
    rows: list[tuple] = []
    size = 0
    try:
        if max_rows is None and max_bytes is None:
            return QueryResult(columns, types, con.fetchall())
        while chunk := con.fetchmany(FETCH_CHUNK if max_rows is None else min(FETCH_CHUNK, max_rows + 1 - len(rows))):
            for row in chunk:
                if max_rows is not None and len(rows) == max_rows:
                    return QueryResult(columns, types, rows, "rows")
                size += value_bytes(row)
                if max_bytes is not None and size > max_bytes:
                    if not rows:
                        raise CatalogError("query", f"the result's first row alone takes more than the limit of "
                                                    f"{max_bytes:,} bytes per answer; select less of it "
                                                    f"(e.g. left(column, n))")
                    return QueryResult(columns, types, rows, "bytes")
                rows.append(row)
        return QueryResult(columns, types, rows)
    except (duckdb.InterruptException, duckdb.OutOfMemoryException, CatalogError):  # CatalogError: said above
        raise
    except duckdb.Error as exc:
        raise CatalogError("query", _reason(exc)) from exc
    except (OverflowError, ValueError) as exc:  # a value Python cannot hold (an interval of 1e9 days)
        raise CatalogError("query", f"a value of the result cannot be read back ({exc}); cast it to VARCHAR") from exc


def run_query(con: duckdb.DuckDBPyConnection, query: str, limits: Limits, max_rows: int | None = None,
              max_bytes: int | None = None) -> QueryResult:
    """Run ``query`` (one or more statements; the last one's result is returned) on ``con``, a connection
    made by :func:`lock_down`: every statement checked first (:func:`check_statement`), then all of them
    in one read-only transaction, rolled back after, within ``limits.timeout_s``, at most ``max_rows``
    rows and about ``max_bytes`` of values fetched (None: no cap)."""
    statements = _statements(con, query)
    for statement in statements:
        check_statement(statement)

    def run() -> QueryResult:
        con.execute("BEGIN TRANSACTION READ ONLY")
        try:
            for statement in statements:
                _execute(con, statement)
            return _fetch(con, max_rows, max_bytes)
        finally:
            with contextlib.suppress(duckdb.Error):  # an interrupted or failed transaction may be gone already
                con.execute("ROLLBACK")

    return limited(con, limits, "query", run)


def run_user_sql(path: str | Path | None, query: str, limits: Limits | None = None,
                 con: duckdb.DuckDBPyConnection | None = None, cap_memory: bool = False
                 ) -> tuple[list[str] | None, list[tuple]]:
    """The ``sql`` command: ``query`` run by :func:`run_query` on the catalog at ``path`` (None: the default
    catalog) opened read-only, within ``limits``; returns the last statement's column names and rows (None
    and [] when it returns no result set). ``con``: a connection to run it on instead (a store snapshot's,
    held in memory), locked down here. ``cap_memory``: :func:`cap_process_memory` once it is open (a
    process that does nothing else)."""
    limits = limits or Limits()
    from_file = con is None
    con = lock_down(con, limits) if con is not None else open_user_sql(path, limits)
    if cap_memory:
        cap_process_memory(limits)
    try:
        result = run_query(con, query, limits)
    except CatalogError as exc:
        note = _older_schema(con, str(path or default_path())) if from_file else ""
        raise CatalogError(exc.field, exc.message + note) from exc
    finally:
        con.close()
    return result.columns, result.rows


def _older_schema(con: duckdb.DuckDBPyConnection, path: str) -> str:
    """A note for a failed query on a catalog of an older schema this version can upgrade (``sql`` opens
    it read-only, never upgrading it): a view, column or macro argument the README names may not be there
    yet. Nothing for a catalog at head or newer, or a file that is no catalog."""
    try:
        older = schema_upgradable(lambda q: con.execute(q).fetchone()[0])
    except duckdb.Error:
        return ""
    if older is None:
        return ""
    return (f" (this catalog has schema {older[0]}, this version uses {older[1]}: open it once with write access "
            f"to upgrade it, e.g. python -m sae_discover runs list --db {shlex.quote(path)})")


def json_value(value: Any) -> Any:
    """A query result's value as JSON has it (the ``sql`` command's ``--format json`` and ``POST /v1/sql``):
    numbers, strings, booleans and null as they are (NaN and infinities as null, integers beyond 64 bits
    as text), lists and structs/maps recursively (map keys as text), anything else (dates, times,
    decimals, UUIDs, intervals, blobs) as its Python text."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def text_value(value: Any) -> str:
    """A query result's value in a text table (TSV, CSV): empty for null, a list or struct as its JSON
    (as :func:`json_value` has it, not Python's ``[None]``), anything else its Python text."""
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(json_value(value), ensure_ascii=False)
    return str(value)


# -- filters: one boolean expression over the rows of one table ------------------------------------

def parse_filter(where: str, field: str) -> duckdb.Expression:
    """``where`` parsed as one SQL expression (DuckDB's parser); a filter that is not exactly one
    expression is refused, so it can never extend the statement it is used in."""
    if not isinstance(where, str) or not where.strip():
        raise CatalogError(field, "expected a boolean SQL expression over v_runs columns, got an empty filter")
    try:
        return duckdb.SQLExpression(where)
    except duckdb.Error as exc:
        try:  # tell a filter that tries to close the statement it sits in from a plain syntax error
            spliced = duckdb.extract_statements(f"SELECT 1 FROM v_runs WHERE ({where})")
        except duckdb.Error:
            spliced = None
        if spliced is not None and (len(spliced) != 1 or spliced[0].type != duckdb.StatementType.SELECT):
            raise CatalogError(field, "expected one boolean SQL expression over v_runs columns, e.g. "
                                      "\"model_id = 'demo' AND mode = 'text'\"") from exc
        raise CatalogError(field, f"not a valid SQL filter over v_runs ({_reason(exc)})") from exc


def _walk(node) -> list[dict]:
    if isinstance(node, dict):
        return [node, *(n for v in node.values() for n in _walk(v))]
    if isinstance(node, list):
        return [n for v in node for n in _walk(v)]
    return []


def _check_filter(con: duckdb.DuckDBPyConnection, expr: duckdb.Expression, field: str) -> None:
    """Refuse subqueries (a filter is a condition on one row's columns) and the functions that read the
    process's settings or environment, from the parsed expression (DuckDB's own serialisation of it)."""
    ((tree,),) = con.execute("SELECT json_serialize_sql($q)", {"q": f"SELECT {expr}"}).fetchall()
    for node in _walk(json.loads(tree).get("statements", [])):
        if node.get("class") == "SUBQUERY":
            raise CatalogError(field, "a run filter is a condition on a run's columns: subqueries are refused")
        name = str(node.get("function_name", "")).lower() if node.get("class") == "FUNCTION" else ""
        if name in FILTER_REFUSED_FUNCTIONS or name.startswith(FILTER_REFUSED_PREFIXES):
            raise CatalogError(field, f"function {name}() is refused in a run filter")


def filter_rows(rows, table: str, where: str, field: str, key: str, limits: Limits | None = None) -> list:
    """The ``key`` values of the ``rows`` (an Arrow table, the whole of view ``table``) that satisfy the
    filter ``where``: evaluated on an in-memory copy holding only those rows, locked down, in limits."""
    limits = limits or Limits()
    expr = parse_filter(where, field)
    con = duckdb.connect(":memory:")
    try:
        con.register("user_filter_source", rows)
        con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM user_filter_source')
        con.unregister("user_filter_source")
        lock_down(con, limits)
        _check_filter(con, expr, field)

        def run() -> list:
            try:
                return [r[0] for r in con.table(table).filter(expr).project(key).fetchall()]
            except (duckdb.InterruptException, duckdb.OutOfMemoryException):
                raise
            except duckdb.Error as exc:
                raise CatalogError(field, f"the filter failed over {table} ({_reason(exc)})") from exc

        return limited(con, limits, field, run)
    finally:
        con.close()
