"""Opening a catalog: a locked file and an unusable file are told apart by the OS lock, not by error text;
errors carry their field as data; the user-SQL connection is read-only and its configuration locked."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from catalog import sandbox
from catalog.db import Catalog
from catalog.errors import CatalogError, CatalogLocked, CatalogWarning
from tests.conftest import ROOT, held_catalog, run_cli


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


# -- damaged catalogs and write-ahead logs (issue 12, item 6) ---------------------------------------

WRITER = """
import os, sys
from catalog.db import Catalog
cat = Catalog(sys.argv[1])
con = cat.raw()
con.execute("CREATE TABLE probe (i INTEGER, s VARCHAR)")
con.execute("CHECKPOINT")
for k in range(8):  # eight committed transactions, only in the WAL: the writer dies before any checkpoint
    con.execute("INSERT INTO probe SELECT range, repeat('x', 40) FROM range(?, ?)", [k * 500, (k + 1) * 500])
os._exit(0)
"""


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> tuple[bytes, bytes]:
    """The bytes of a catalog file and of its WAL, left by a writer that died after eight commits."""
    tmp = tmp_path_factory.mktemp("crashed")
    path = tmp / "c.duckdb"
    subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True, cwd=ROOT, timeout=120)
    wal = Path(f"{path}.wal")
    assert wal.stat().st_size > 8 * 500 * 40
    return path.read_bytes(), wal.read_bytes()


def lay(tmp_path: Path, db: bytes, wal: bytes) -> Path:
    path = tmp_path / "c.duckdb"
    path.write_bytes(db)
    Path(f"{path}.wal").write_bytes(wal)
    return path


def probe_rows(path: Path) -> tuple[int, list[str]]:
    """Rows of the probe table after opening the catalog, and the catalog warnings the open gave."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cat = Catalog(path)
        try:
            (n,) = cat.raw().execute("SELECT count(*) FROM probe").fetchone()
        finally:
            cat.close()
    return n, [str(w.message) for w in seen if issubclass(w.category, CatalogWarning)]


def commit_entries(wal: bytes) -> list[int]:
    """Where each commit entry of the WAL starts, found by its bytes: a frame of length 5 (u64), an 8-byte
    checksum, then the payload ``64 00 64 ff ff`` (field 100, the entry's type, = 100, WAL_FLUSH; end)."""
    frame = re.compile(re.escape((5).to_bytes(8, "little")) + b".{8}" + re.escape(b"\x64\x00\x64\xff\xff"), re.S)
    return [m.start() for m in frame.finditer(wal)]


def assert_replayed(path: Path, cut: int, commits: list[int]) -> None:
    """Opening the catalog whose WAL was cut at ``cut``: the transactions committed before the cut come
    back, nothing else; one warning unless the cut falls right after a commit (a shorter whole WAL)."""
    whole = sum(start + 16 + 5 <= cut for start in commits)
    n, said = probe_rows(path)
    assert n == whole * 500
    if cut in [start + 16 + 5 for start in commits]:
        assert said == []
    else:
        (line,) = said
        assert f"the write-ahead log of {path} was incomplete" in line and "may be lost" in line, said
    assert probe_rows(path)[0] == n  # nothing more is lost by opening it again


@pytest.mark.parametrize("eighths", range(1, 9))  # 0 bytes: no entry to tell from no WAL
def test_a_wal_cut_short_is_replayed_whole_or_reported(crashed, tmp_path, eighths):
    db, wal = crashed
    commits = commit_entries(wal)
    assert len(commits) == 8 and commits[-1] + 16 + 5 == len(wal)
    cut = len(wal) * eighths // 8
    assert_replayed(lay(tmp_path, db, wal[:cut]), cut, commits)


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_wal_cut_between_entries_is_reported_unless_it_ends_on_a_commit(crashed, tmp_path, where):
    """Cut on an entry boundary: before the third transaction's commit entry (its rows are whole entries,
    uncommitted: DuckDB drops them, and the open says so), or right after it (a whole WAL of three)."""
    db, wal = crashed
    commits = commit_entries(wal)
    cut = commits[2] + (16 + 5 if where == "after" else 0)
    assert_replayed(lay(tmp_path, db, wal[:cut]), cut, commits)
    assert probe_rows(tmp_path / "c.duckdb")[0] == (3 if where == "after" else 2) * 500


def test_a_wal_cut_short_is_one_warning_line_in_the_cli(crashed, tmp_path):
    db, wal = crashed
    path = lay(tmp_path, db, wal[: len(wal) * 5 // 8])
    proc = run_cli("runs", "list", "--db", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: db: the write-ahead log of") and proc.stderr.count("\n") == 1, proc.stderr


def test_a_damaged_wal_is_one_line_naming_it(crashed, tmp_path):
    db, wal = crashed
    damaged = bytearray(wal)
    damaged[len(wal) // 2: len(wal) // 2 + 64] = bytes(64)
    path = lay(tmp_path, db, bytes(damaged))
    with pytest.raises(CatalogError) as info:
        Catalog(path)
    assert not isinstance(info.value, CatalogLocked)
    assert info.value.field == "db" and f"{path}.wal (the write-ahead log of {path}) cannot be replayed" in str(info.value)
    proc = run_cli("runs", "list", "--db", str(path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: db: {path}.wal (the write-ahead log")


@pytest.mark.parametrize(("content", "words"), [
    (b"", "is an empty file, not a DuckDB catalog"),
    (b"DUCK" + bytes(8188), "is not a usable DuckDB catalog"),
    (b"id,label\n1,revenue\n" * 300, "is not a usable DuckDB catalog"),
    (None, "is a directory; give a catalog file"),
], ids=["empty", "bad-header", "text", "directory"])
def test_an_unusable_catalog_path_is_one_line_naming_it(tmp_path, content, words):
    path = tmp_path / "c.duckdb"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    for args in (("runs", "list"), ("sql", "SELECT 1"), ("--text", "hi", "--model", "demo")):
        proc = run_cli(*args, "--db", str(path))
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "held by" not in proc.stderr
        assert proc.stderr.startswith(f"error: db: {path}") and words in proc.stderr, proc.stderr


def test_a_catalog_that_knows_a_model_by_its_old_fingerprint_keeps_its_key_and_calibration(toy_registry, tmp_path):
    """Earlier versions hashed the model folder's path (and the transformers version) into the weights
    fingerprint. A catalog holding the model under that fingerprint adopts the new one on first use: the
    same model key, its calibration reused (no second first-use calibration), one row per model."""
    from sae_discover.registry import Registry
    from sae_discover.request import build_request
    from sae_discover.service import Discovery

    req = {"model_id": "toy", "sae_id": "toy", "text": "Shares rose 4% on Monday.", "layers": [1]}
    cat = Catalog(tmp_path / "c.duckdb")
    first = Discovery(cat, Registry.load(toy_registry), device="cpu")
    assert any("calibrated" in w for w in first.discover(build_request(req))["warnings"])
    card = first.loaders.card(first.loaders.entry("toy"))
    assert card.legacy_fingerprint and card.legacy_fingerprint != card.fingerprint
    with cat.raw() as con:  # the catalog as an earlier version left it
        ((key,),) = con.execute("SELECT model_key FROM models WHERE model_id = 'toy'").fetchall()
        con.execute("UPDATE models SET fingerprint = ? WHERE model_key = ?", [card.legacy_fingerprint, key])
    again = Discovery(cat, Registry.load(toy_registry), device="cpu").discover(build_request(req))
    assert not any("calibrated" in w for w in again["warnings"]) and again["threshold_source"] == "calibration_p95"
    with cat.raw() as con:
        assert con.execute("SELECT model_key, fingerprint FROM models WHERE model_id = 'toy'").fetchall() == [
            (key, card.fingerprint)]
    cat.close()
