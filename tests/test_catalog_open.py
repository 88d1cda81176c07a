"""Opening a catalog: a locked file and an unusable file are told apart by the OS lock, not by error text;
errors carry their field as data; the user-SQL connection is read-only and its configuration locked."""

from __future__ import annotations

import pickle

import pytest

from catalog import sandbox
from catalog.db import Catalog
from catalog.errors import CatalogError, CatalogLocked
from tests.conftest import held_catalog


def test_errors_carry_field_and_message():
    exc = CatalogError("layers", "expected a list")
    assert (exc.field, exc.message, str(exc)) == ("layers", "expected a list", "layers: expected a list")
    assert isinstance(exc, ValueError)
    again = pickle.loads(pickle.dumps(exc))
    assert (again.field, again.message, str(again)) == (exc.field, exc.message, str(exc))
    locked = pickle.loads(pickle.dumps(CatalogLocked("held")))
    assert (locked.field, locked.message, str(locked)) == ("db", "held", "held")


@pytest.mark.parametrize("read_only", [False, True])
def test_a_file_of_random_bytes_is_not_a_catalog(tmp_path, read_only):
    path = tmp_path / "noise.duckdb"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CatalogError) as info:
        Catalog(path, read_only=read_only)
    assert not isinstance(info.value, CatalogLocked)
    assert info.value.field == "db" and "is not a usable DuckDB catalog" in info.value.message
    with pytest.raises(CatalogError) as info:
        sandbox.run_user_sql(path, "SELECT 1")
    assert info.value.field == "db"


def test_a_missing_file_for_queries_names_db(tmp_path):
    with pytest.raises(CatalogError) as info:
        sandbox.run_user_sql(tmp_path / "absent.duckdb", "SELECT 1")
    assert info.value.field == "db" and "does not exist" in info.value.message


def test_a_file_held_by_another_process_is_locked(tmp_path):
    path = tmp_path / "held.duckdb"
    with held_catalog(path):
        for read_only in (False, True):
            with pytest.raises(CatalogLocked) as info:
                Catalog(path, read_only=read_only)
            assert info.value.field == "db" and "held by another process" in info.value.message
        with pytest.raises(CatalogLocked):
            sandbox.run_user_sql(path, "SELECT 1")
    Catalog(path).close()  # free again once the holder is gone


def test_user_sql_is_read_only_and_its_configuration_locked(tmp_path):
    path = tmp_path / "c.duckdb"
    Catalog(path).close()
    cols, rows = sandbox.run_user_sql(path, "SELECT count(*) AS n FROM v_runs")
    assert (cols, rows) == (["n"], [(0,)])
    sandbox.run_user_sql(path, "SET VARIABLE x = 1")  # harmless statements still run
    for query in ("DELETE FROM runs", "CREATE TABLE t (i INT)", f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'"):
        with pytest.raises(CatalogError) as info:
            sandbox.run_user_sql(path, query)
        assert info.value.field == "query" and "write statements are refused" in info.value.message
    assert not (tmp_path / "out.csv").exists()
    for query in ("SET memory_limit = '100GB'", "SET enable_external_access = true", "SELECT * FROM nowhere",
                  "SELEC 1", ""):
        with pytest.raises(CatalogError) as info:
            sandbox.run_user_sql(path, query)
        assert info.value.field == "query"
    con = sandbox.open_user_sql(path)
    try:
        (limit,) = con.execute("SELECT current_setting('memory_limit')").fetchone()
        assert limit.endswith("GiB") and float(limit.split()[0]) < 2
    finally:
        con.close()
