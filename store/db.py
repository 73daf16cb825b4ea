"""Opening the SQLite store: WAL, busy timeout, ordered migrations, transactions.

Each process (and each thread) opens its own connection with :func:`open_db`; nothing is
shared across fork. ``with open_db(path) as db:`` closes it on exit; a plain
``db = open_db(path)`` stays open until ``db.close()``. Migrations are a plain ordered
list (:mod:`store.schema`): each runs in one transaction and is recorded in
``migrations`` so an older database is upgraded in place on open.

Writes go through :func:`transaction` (one ``BEGIN IMMEDIATE``) and :func:`savepoint` (a
nested unit of work inside it). How much of sqlite-utils we use, and why: its
``Database`` is our connection type (``db.query`` gives dict rows, and tests use its
table introspection), but the store's statements are raw SQL in named functions. Its
``insert``/``upsert`` helpers introspect the table's columns on every call and choose
their own conflict handling, which costs the ingest hot path a ``PRAGMA`` round trip per
row and hides what a statement does; the statements here are short, and each is written
once, next to the schema it touches.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import sqlite_utils

from store.errors import store_error
from store.schema import MIGRATIONS, Migration, migrate

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MIGRATIONS",
    "Database",
    "Migration",
    "migrate",
    "open_db",
    "savepoint",
    "transaction",
]

BUSY_TIMEOUT_MS = 30_000


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    _enable_wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (persistent, so a no-op once done), retrying while locked.

    SQLite answers a journal-mode change that races another connection opening the same
    new file with SQLITE_BUSY *without* calling the busy handler, so ``busy_timeout`` does
    not cover it. Two threads opening a fresh store at once (the inbox worker and a status
    reader) hit this; without the retry one of them failed with "database is locked".
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Database(sqlite_utils.Database):
    """A store connection that is also a context manager closing it on exit.

    Declared here rather than relying on the installed sqlite-utils (whose ``__exit__``
    appeared only in recent releases), so ``with open_db(path) as db:`` works with every
    version the project allows.
    """

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.conn.close()


def open_db(
    path: str | Path, *, apply_migrations: bool = True, cache_mib: int | None = None
) -> Database:
    """Open (creating if needed) the store at ``path``, migrated to the latest schema.

    ``cache_mib`` raises SQLite's page cache for this connection (bulk ingest keeps the
    index pages of ``files`` and ``documents`` hot with 64 MiB). A database the user must
    do something about (disk full, corrupt, unwritable, locked too long) raises a
    :class:`~store.errors.StoreError` whose one line names the file and the fix.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(path)
        conn = _connect_and_migrate(path, apply_migrations, cache_mib)
    except (sqlite3.Error, OSError) as exc:
        err = store_error(exc, path)
        if err is None:
            raise
        raise err from exc
    return Database(conn)


def _create_private(path: Path) -> None:
    """Create a new database file as 0600 whatever the umask; SQLite gives its -wal and
    -shm files the mode of the database file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _connect_and_migrate(
    path: Path, apply_migrations: bool, cache_mib: int | None
) -> sqlite3.Connection:
    conn = sqlite3.connect(
        str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        _configure(conn)
        if cache_mib is not None:
            conn.execute(f"PRAGMA cache_size = {-1024 * int(cache_mib)}")  # negative = KiB
        if apply_migrations:
            migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One write transaction (BEGIN IMMEDIATE so writers queue on the busy timeout)."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        _rollback_if_open(db.conn, "ROLLBACK")
        raise
    db.conn.execute("COMMIT")


_savepoint_ids = itertools.count(1)


@contextmanager
def savepoint(db: sqlite_utils.Database, name: str = "sp") -> Iterator[sqlite_utils.Database]:
    """A nested unit of work: its writes are kept on success and undone on error.

    Inside the caller's transaction it is a SQLite savepoint (released on success, rolled
    back to on error, then the error propagates), so one failing step cannot leave half
    its rows in the caller's transaction. Outside any transaction it *is* one
    (:func:`transaction`, ``BEGIN IMMEDIATE``), so a helper that may be called either way
    ("my transaction, or the caller's") is just ``with savepoint(db):``. Savepoint names
    get a process-wide counter, so nesting (even re-entrant use of one name) is safe.
    """
    if not name.isidentifier():
        raise ValueError(f"savepoint name must be an identifier, got {name!r}")
    conn = db.conn
    if not conn.in_transaction:
        with transaction(db):
            yield db
        return
    sp = f"{name}_{next(_savepoint_ids)}"
    conn.execute(f'SAVEPOINT "{sp}"')
    try:
        yield db
    except BaseException:
        _rollback_if_open(conn, f'ROLLBACK TO "{sp}"', f'RELEASE "{sp}"')
        raise
    conn.execute(f'RELEASE "{sp}"')


def _rollback_if_open(conn: sqlite3.Connection, *statements: str) -> None:
    """Undo after an error, unless SQLite already ended the transaction itself.

    Some errors (disk full, I/O error, an interrupted statement) roll back the whole
    transaction and its savepoints; a ROLLBACK then fails with "no transaction is active"
    and would replace the error that matters.
    """
    if conn.in_transaction:
        for statement in statements:
            conn.execute(statement)


@contextmanager
def page_cache_at_most(db: sqlite_utils.Database, mib: int) -> Iterator[None]:
    """Cap this connection's page cache at ``mib`` MiB for a while (then restore it).

    A transaction that writes a lot fills the cache with dirty pages up to its size; a
    smaller cache makes SQLite spill them to the WAL early instead of holding them.
    """
    conn = db.conn
    before = int(conn.execute("PRAGMA cache_size").fetchone()[0])
    limit = -1024 * int(mib)  # negative = KiB
    current_kib = -before if before < 0 else before * _page_size_kib(conn)
    if current_kib <= -limit:
        yield
        return
    conn.execute(f"PRAGMA cache_size = {limit}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA cache_size = {before}")


def _page_size_kib(conn: sqlite3.Connection) -> int:
    return max(1, int(conn.execute("PRAGMA page_size").fetchone()[0]) // 1024)
