"""User-written SQL — the ``sql`` command's statements and the drift run filters — on a locked-down connection.

Every connection that runs user SQL is made by :func:`lock_down`: external access off (no COPY TO, no
``read_csv``/``read_text``/``glob`` of arbitrary paths, no extension loading), a memory limit, and
then its configuration locked, so a statement cannot switch any of that back. Every statement runs
under a time limit (:func:`limited`: a timer interrupts the query). The ``sql`` command's connection
opens the catalog file read-only; a drift filter is parsed as one expression (never spliced into a
statement) and evaluated on an in-memory copy of the ``v_runs`` rows, so it can see no other table,
no file and no sequence. Errors come back as :class:`CatalogError` naming the user's field (``query``,
a filter's field, ``memory_limit``, ``timeout_s``, ``db``) or :class:`CatalogLocked`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from catalog.db import default_path, open_error
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


def cap_process_memory(limits: Limits) -> None:
    """Cap this process's address space at what it uses now plus twice the memory limit (Linux).

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
    cap = used + 2 * size_bytes(limits.memory_limit)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
                                  "(raise it with --timeout_s)") from exc
    except (duckdb.OutOfMemoryException, MemoryError) as exc:
        raise CatalogError(field, f"needs more than the memory limit of {limits.memory_limit} "
                                  f"(raise it with --memory_limit): {_first_line(exc)}") from exc
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
                                            f"through that process or stop it ({_first_line(exc)})")
        raise (error or CatalogError("db", f"{path} cannot be opened for queries: {_first_line(exc)}")) from exc
    return lock_down(con, limits)


def _statements(con: duckdb.DuckDBPyConnection, query: str) -> list:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise CatalogError("query", _first_line(exc)) from exc
    if not statements:
        raise CatalogError("query", "expected a SQL statement (the query is empty or only comments)")
    return statements


def run_user_sql(path: str | Path | None, query: str,
                 limits: Limits | None = None) -> tuple[list[str] | None, list[tuple]]:
    """Run ``query`` (one or more statements) read-only on the catalog at ``path`` (None: the default
    catalog) within ``limits``; returns the last statement's column names and rows (None and [] when it
    returns no result set)."""
    limits = limits or Limits()
    con = open_user_sql(path, limits)

    def run() -> tuple[list[str] | None, list[tuple]]:
        cur = None
        for statement in _statements(con, query):
            try:
                cur = con.execute(statement)
            except (duckdb.InterruptException, duckdb.OutOfMemoryException):
                raise
            except duckdb.Error as exc:
                if statement.type in WRITE_STATEMENTS:
                    raise CatalogError("query", "write statements are refused: the sql command is read-only") from exc
                raise CatalogError("query", _first_line(exc)) from exc
        if cur is None or cur.description is None:
            return None, []
        try:
            return [d[0] for d in cur.description], cur.fetchall()
        except (duckdb.InterruptException, duckdb.OutOfMemoryException):
            raise
        except duckdb.Error as exc:
            raise CatalogError("query", _first_line(exc)) from exc

    try:
        return limited(con, limits, "query", run)
    finally:
        con.close()


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
        raise CatalogError(field, f"not a valid SQL filter over v_runs ({_first_line(exc)})") from exc


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
                raise CatalogError(field, f"the filter failed over {table} ({_first_line(exc)})") from exc

        return limited(con, limits, field, run)
    finally:
        con.close()
