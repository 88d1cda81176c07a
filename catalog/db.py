"""Open a catalog file: engine, alembic ``upgrade head``, and the raw DuckDB connection for bulk work.

One process writes a catalog file at a time (DuckDB's file lock). Opening a file that another
process holds raises :class:`CatalogLocked` with a message that says what to do; a file DuckDB
cannot use raises :class:`CatalogError` naming ``db``. Which of the two is decided by asking the
operating system whether the file is locked, never by reading DuckDB's error text.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import migrations
from catalog.errors import CatalogError, CatalogLocked, CatalogReadOnly, CatalogWarning

DEFAULT_DB = "sae_catalog.duckdb"
MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
WAL_HEADER_MAX = 256  # bytes: the WAL's version header (a small serialized object) ends within these


def default_path() -> str:
    return os.environ.get("SAE_DISCOVER_DB") or DEFAULT_DB


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def held_by_another_process(path: str | Path, read_only: bool) -> bool:
    """Whether another process holds a lock on ``path`` that keeps this open out: an exclusive lock
    (a writer) for a read-only open, any lock (a writer or readers) for a read-write one.

    DuckDB locks its file with POSIX record locks, so a non-blocking ``lockf`` probe conflicts with
    exactly the locks DuckDB would. Call it only after DuckDB failed to open the file (an
    ``IOException``): closing the probe's descriptor releases every POSIX lock this process holds on
    the file, and after such a failure it holds none (DuckDB has just opened and closed it the same way).
    """
    try:
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    except OSError:  # missing, a directory, no permission: not a lock
        return False
    try:
        fcntl.lockf(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:  # BlockingIOError (EAGAIN) or EACCES: someone else holds a conflicting lock
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# the first bytes of the payload of a WAL entry that closes a transaction: field 100 (the entry's type,
# little-endian u16) then the type as a varint — 100, WAL_FLUSH (a commit), or 99, WAL_CHECKPOINT
WAL_CLOSING_ENTRIES = (b"\x64\x00\x64", b"\x64\x00\x63")


def _wal_chain_end(fh, start: int, size: int) -> tuple[int, int]:
    """Where the run of whole WAL entries that begins at ``start`` ends (``size`` when it fills the file),
    and where its last whole transaction ends (after its last commit entry; ``start`` before any)."""
    pos = committed = start
    while pos + 16 <= size:
        fh.seek(pos)
        frame = fh.read(16 + 3)  # length, checksum, the payload's first bytes
        (length,) = struct.unpack("<Q", frame[:8])
        if length > size - pos - 16:
            break
        pos += 16 + length
        if frame[16:] in WAL_CLOSING_ENTRIES:
            committed = pos
    return pos, committed


def wal_cut_short(path: str | Path) -> tuple[int, int] | None:
    """``(committed_bytes, size)`` when ``path``'s write-ahead log ends inside a transaction — inside an
    entry, or between the entries of a transaction not yet committed (a crash or a copy cut it short:
    DuckDB replays the committed transactions and silently skips the rest); None when there is no WAL
    or it ends with a commit.

    DuckDB 2.0's WAL (the catalog pins duckdb <2.1) is a version header, a serialized object that ends
    with the 0xFFFF end-of-object marker, then entries framed as ``u64 length, u64 checksum, payload``;
    a transaction is its entries then a commit entry (:data:`WAL_CLOSING_ENTRIES`). The header's length
    varies, so every end marker in its first bytes is tried as the start of the entries: a complete WAL
    chains to its last byte, and to its last commit, from the right one (no false warning).
    """
    wal = Path(f"{path}.wal")
    try:
        size = wal.stat().st_size
        if size == 0:
            return None
        with wal.open("rb") as fh:
            head = fh.read(WAL_HEADER_MAX)
            chains = [(i + 2, *_wal_chain_end(fh, i + 2, size))
                      for i in range(len(head) - 1) if head[i:i + 2] == b"\xff\xff"]
    except OSError:  # unreadable: DuckDB's own open reports it
        return None
    if any(end == committed == size for _, end, committed in chains):
        return None
    # the entries start where the longest chain starts (the earliest such marker): its last commit
    _, _, committed = max(chains, key=lambda chain: (chain[1], -chain[0]), default=(0, 0, 0))
    return committed, size


def cannot_write(path: str) -> str | None:
    """Why this process cannot open the existing catalog ``path`` read-write, or None when it can (or the
    file is not there yet). DuckDB writes the file, and creates and removes its write-ahead log next to
    it, so the file, the folder and a WAL left there must all be writable."""
    if path == ":memory:" or not Path(path).is_file():
        return None
    wal = Path(f"{path}.wal")
    for what, target in (("the file", Path(path)), ("its folder", Path(path).parent), ("its write-ahead log", wal)):
        if (target is not wal or wal.exists()) and not os.access(target, os.W_OK):
            return f"{what} is not writable"
    return None


def schema_behind(scalar: Callable[[str], Any]) -> tuple[str | None, str] | None:
    """``(the catalog's schema revision, head)`` when they differ (a read-only open cannot upgrade it), else
    None; ``scalar(sql)``: the first value of a query on the catalog (SQLAlchemy's or a raw connection's)."""
    known = scalar("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'alembic_version'")
    current = scalar("SELECT max(version_num) FROM alembic_version") if known else None
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    return None if current == head else (current, head or "")


def schema_upgradable(scalar: Callable[[str], Any]) -> tuple[str, str] | None:
    """``(the catalog's schema revision, head)`` when the catalog is at an older revision this version
    knows (a write-access open would upgrade it); None at head, for a newer catalog or for a file that is
    no catalog (no revision)."""
    behind = schema_behind(scalar)
    if behind is None or behind[0] is None:
        return None
    known = {r.revision for r in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}
    return (behind[0], behind[1]) if behind[0] in known else None


def open_error(path: str, read_only: bool, exc: BaseException, locked_message: str) -> Exception | None:
    """The catalog's error for DuckDB failing to open ``path`` (``exc``, possibly wrapped by SQLAlchemy):
    :class:`CatalogLocked` (with ``locked_message``) when another process holds the file,
    :class:`CatalogError` (``db``) when the file is unusable; None for an error that is not about the
    file (the caller raises the original)."""
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    if not isinstance(cause, duckdb.Error) or path == ":memory:":
        return None
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if not isinstance(cause, duckdb.IOException):  # the file's header was read; replaying its WAL failed
        wal = Path(f"{path}.wal")
        if wal.is_file() and wal.stat().st_size:
            return CatalogError("db", f"{wal} (the write-ahead log of {path}) cannot be replayed, it is damaged "
                                      f"({first}); move it aside to open the catalog as of its last checkpoint "
                                      "(the transactions in it are then lost)")
        return CatalogError("db", f"{path} is not a usable DuckDB catalog: {first}")
    if held_by_another_process(path, read_only):
        return CatalogLocked(locked_message)
    if read_only and not Path(path).exists():
        return CatalogError("db", f"{path} does not exist")
    if not Path(path).exists() and not os.access(Path(path).parent, os.W_OK):
        return CatalogError("db", f"{path} cannot be created: its folder is not writable")
    if Path(path).is_dir():
        return CatalogError("db", f"{path} is a directory; give a catalog file (e.g. {Path(path) / DEFAULT_DB})")
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return CatalogError("db", f"{path} is an empty file, not a DuckDB catalog; remove it to start a new catalog")
    return CatalogError("db", f"{path} is not a usable DuckDB catalog: {first}")


class Catalog:
    """A catalog file, migrated to head, with a lock that serialises this process's writes.

    ``read_only``: True opens the file read-only; None (the default) does so only when this process
    cannot write it (:func:`cannot_write`). A read-only catalog answers every read; a write is refused
    by :meth:`require_writable` before any work for it is done.
    """

    def __init__(self, path: str | Path | None = None, read_only: bool | None = None, migrate: bool = True) -> None:
        self.path = str(path or default_path())
        # why this catalog is read-only (None: it is writable)
        if read_only is None:
            self.read_only_reason = cannot_write(self.path)
        else:
            self.read_only_reason = "opened read-only" if read_only else None
        self.read_only = read_only = self.read_only_reason is not None
        if self.path != ":memory:" and not read_only:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError("db", f"{self.path}: its folder cannot be made ({exc.strerror or exc})") from exc
        self.url = f"duckdb:///{self.path}"
        args = {"read_only": True} if read_only else {}
        self.engine = sa.create_engine(self.url, connect_args=args, poolclass=sa.pool.SingletonThreadPool)
        self.write_lock = threading.RLock()
        # catalog keys of models/SAEs whose rows are committed (filled by writes.transaction after commit)
        self.known_keys: dict = {}
        self.pending_keys: dict = {}
        cut = None if self.path == ":memory:" else wal_cut_short(self.path)
        try:
            conn = self.engine.connect()
        except Exception as exc:
            self.engine.dispose()
            error = open_error(
                self.path, read_only, exc,
                f"catalog {self.path} is held by another process (DuckDB allows one writer per file). Stop that "
                "process, point --db / SAE_DISCOVER_DB at another file, or send the request to the running "
                "server (python -m sae_discover serve).")
            if error is None:
                raise
            raise error from exc
        if cut is not None:
            warnings.warn(CatalogWarning(
                f"db: the write-ahead log of {self.path} was incomplete (it ends inside a transaction: {cut[0]} of "
                f"{cut[1]} bytes hold whole transactions); the last transaction(s) written before a crash may be "
                "lost"), stacklevel=2)
        try:
            with conn:
                conn.exec_driver_sql("SELECT 1")
                if migrate and not read_only:
                    cfg = alembic_config(self.url)
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                    conn.commit()
                elif migrate and (behind := schema_behind(lambda q: conn.exec_driver_sql(q).scalar())) is not None:
                    raise CatalogError("db", f"{self.path} has catalog schema {behind[0] or 'none'}, this version "
                                             f"uses {behind[1]}; a read-only catalog ({self.read_only_reason}) is "
                                             "not upgraded: open it once with write access")
        except Exception:
            self.engine.dispose()
            raise

        # One DuckDB database instance per process and file: every cursor below shares it (and its
        # transactions see each other's commits), instead of a second duckdb.connect() to the file.
        self._pooled = self.engine.raw_connection()
        wrapper = self._pooled.driver_connection
        self._base: duckdb.DuckDBPyConnection = getattr(wrapper, "_ConnectionWrapper__c", wrapper)
        if not read_only:
            # checkpoint (fold the WAL into the file) only after a large WAL, not DuckDB's small default:
            # one commit per run stays cheap under bulk ingest (README, Performance), and a crash
            # still replays the WAL on the next open
            self._base.execute("SET checkpoint_threshold = '256MB'")

    def require_writable(self, what: str) -> None:
        """Refuse ``what`` (e.g. "storing a new run") on a read-only catalog, before any work for it is done."""
        if self.read_only:
            raise CatalogReadOnly("db", f"{self.path} is read-only ({self.read_only_reason}): {what} needs to "
                                        "write to it; only what is stored can be read")

    def raw(self) -> duckdb.DuckDBPyConnection:
        """A new DuckDB cursor on this catalog (one per thread or task: DuckDB connections are not shared)."""
        return self._base.cursor()

    def close(self) -> None:
        self._pooled.close()
        self.engine.dispose()
