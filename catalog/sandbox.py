"""User-written SQL (the CLI's ``sql`` command) on a connection that can only read the catalog.

The connection is opened read-only with external access off (no COPY TO, no ``read_csv`` of
arbitrary paths, no extension loading) and a memory limit, and then its configuration is locked, so
a statement cannot switch any of that back. Errors come back as :class:`CatalogError` naming
``query`` (the statement) or ``db`` (the file), or :class:`CatalogLocked`.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from catalog.db import default_path, open_error
from catalog.errors import CatalogError

DEFAULT_MEMORY_LIMIT = "2GB"

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_user_sql(path: str | Path | None, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection to the catalog at ``path`` (None: the default catalog) for
    user-written SQL (see the module docstring). Raises :class:`CatalogError` (``db``) for a missing or
    unusable file and :class:`CatalogLocked` when another process holds it for writing."""
    path = str(path or default_path())
    if not Path(path).exists():
        raise CatalogError("db", f"{path} does not exist")
    try:
        con = duckdb.connect(path, read_only=True,
                             config={"enable_external_access": False, "memory_limit": memory_limit})
    except duckdb.Error as exc:
        error = open_error(path, True, exc, f"catalog {path} is held by another process for writing; query it "
                                            f"through that process or stop it ({_first_line(exc)})")
        raise (error or CatalogError("db", f"{path} cannot be opened for queries: {_first_line(exc)}")) from exc
    con.execute("SET lock_configuration = true")
    return con


def run_user_sql(path: str | Path | None, query: str) -> tuple[list[str] | None, list[tuple]]:
    """Run ``query`` (one or more statements) read-only on the catalog at ``path`` (None: the default
    catalog); returns the last statement's column names and rows (None and [] when it returns no
    result set)."""
    con = open_user_sql(path)
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as exc:
            raise CatalogError("query", _first_line(exc)) from exc
        if not statements:
            raise CatalogError("query", "expected a SQL statement")
        cur = None
        for statement in statements:
            try:
                cur = con.execute(statement)
            except duckdb.Error as exc:
                if statement.type in WRITE_STATEMENTS:
                    raise CatalogError("query", "write statements are refused: the sql command is read-only") from exc
                raise CatalogError("query", _first_line(exc)) from exc
        if cur is None or cur.description is None:
            return None, []
        try:
            return [d[0] for d in cur.description], cur.fetchall()
        except duckdb.Error as exc:
            raise CatalogError("query", _first_line(exc)) from exc
    finally:
        con.close()
