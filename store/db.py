"""Opening the SQLite store: WAL, busy timeout, ordered migrations, transactions.

Each process (and each thread) opens its own connection with :func:`open_db`; nothing is
shared across fork. ``with open_db(path) as db:`` closes it on exit; a plain
``db = open_db(path)`` stays open until ``db.close()``. Migrations are a plain ordered
list: each runs in one transaction and is recorded in ``migrations`` so an older database
is upgraded in place on open.

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
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import sqlite_utils

from store.errors import store_error

BUSY_TIMEOUT_MS = 30_000

Migration = Callable[[sqlite3.Connection], None]


def _script(conn: sqlite3.Connection, sql: str) -> None:
    """Run ``;``-separated DDL inside the caller's transaction (executescript would COMMIT)."""
    body = "\n".join(line.split("--")[0] for line in sql.splitlines())
    for statement in body.split(";"):
        if statement.strip():
            conn.execute(statement)


# The schema as first shipped (a module constant, so the migration below stays one line).
_SCHEMA_001 = """
        CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            path TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            format TEXT NOT NULL,
            status TEXT NOT NULL,          -- ingested | trained | superseded | quarantined
            error TEXT,
            n_chunks INTEGER NOT NULL DEFAULT 0,
            n_tokens INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE UNIQUE INDEX documents_track_hash ON documents(track, content_hash);
        CREATE INDEX documents_status ON documents(track, status);

        -- Every path ever seen, with the stat it had, so rescans skip unchanged files in O(1).
        CREATE TABLE files (
            path TEXT PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            content_hash TEXT,
            document_id INTEGER REFERENCES documents(id),
            status TEXT NOT NULL,          -- ingested | duplicate | quarantined | superseded
            error TEXT,
            seen_at REAL NOT NULL
        );
        CREATE INDEX files_document ON files(document_id);

        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            document_id INTEGER NOT NULL REFERENCES documents(id),
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL DEFAULT 'text',   -- text | chat (JSON list of messages)
            text TEXT NOT NULL,
            n_tokens INTEGER NOT NULL,
            split TEXT NOT NULL,                 -- train | holdout
            status TEXT NOT NULL DEFAULT 'pending',  -- pending | trained | superseded | dropped
            stage_id INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            learned_loss REAL,
            created_at REAL NOT NULL
        );
        CREATE INDEX chunks_status ON chunks(track, status, split);
        CREATE INDEX chunks_document ON chunks(document_id);

        CREATE TABLE replay_buffer (
            id INTEGER PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            chunk_id INTEGER NOT NULL REFERENCES chunks(id),
            weight REAL NOT NULL DEFAULT 1.0,
            stage_id INTEGER,
            added_at REAL NOT NULL
        );
        CREATE UNIQUE INDEX replay_track_chunk ON replay_buffer(track, chunk_id);

        CREATE TABLE stages (
            id INTEGER PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            status TEXT NOT NULL,   -- planned|running|trained|evaluated|promoted|rejected|failed
            plan TEXT NOT NULL DEFAULT '{}',
            parent_version TEXT,
            candidate_version TEXT,
            reason TEXT,
            metrics TEXT NOT NULL DEFAULT '{}',
            progress TEXT NOT NULL DEFAULT '{}',
            pid INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            heartbeat_at REAL
        );
        CREATE INDEX stages_status ON stages(track, status);

        CREATE TABLE adapters (
            version TEXT PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            path TEXT NOT NULL,
            parent_version TEXT,
            stage_id INTEGER,
            status TEXT NOT NULL,   -- candidate | promoted | rejected | retired
            metrics TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            promoted_at REAL
        );

        -- The "current" pointer per track; moved only by promote/rollback.
        CREATE TABLE current_adapter (
            track TEXT PRIMARY KEY,
            version TEXT,
            updated_at REAL NOT NULL
        );

        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            track TEXT NOT NULL DEFAULT 'default',
            kind TEXT NOT NULL,
            subject TEXT,
            message TEXT NOT NULL,
            data TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX events_kind ON events(track, kind, id);

        CREATE TABLE kv (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """


def _m001_initial(conn: sqlite3.Connection) -> None:
    _script(conn, _SCHEMA_001)


def _m002_chunk_scores(conn: sqlite3.Connection) -> None:
    """Per-adapter chunk losses, written by the scoring subprocess, read by policies."""
    _script(
        conn,
        """
        CREATE TABLE chunk_scores (
            chunk_id INTEGER NOT NULL REFERENCES chunks(id),
            adapter_version TEXT NOT NULL,      -- '' = the base model
            loss REAL NOT NULL,
            scored_at REAL NOT NULL,
            PRIMARY KEY (chunk_id, adapter_version)
        );
        """,
    )


def _m003_synthetic_chunks(conn: sqlite3.Connection) -> None:
    """Lineage of synthetic study text (store.synthetic) and which chunks were augmented.

    A synthetic text is a ``chunks`` row with ``split = 'synthetic'`` (so the stage reads it
    like any chunk, and every query for train or holdout data skips it); this table says
    where it came from. ``augmentations`` records each (source chunk, method) done.
    """
    _script(
        conn,
        """
        CREATE TABLE chunk_lineage (
            chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE,
            track TEXT NOT NULL DEFAULT 'default',
            source_chunk_id INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
            method TEXT NOT NULL,
            variant TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX chunk_lineage_source ON chunk_lineage(source_chunk_id);
        CREATE INDEX chunk_lineage_hash ON chunk_lineage(track, content_hash);
        CREATE TABLE augmentations (
            source_chunk_id INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
            method TEXT NOT NULL,
            kept INTEGER NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            done_at REAL NOT NULL,
            PRIMARY KEY (source_chunk_id, method)
        );
        """,
    )


def _m004_path_key_backslashes(conn: sqlite3.Connection) -> None:
    """Path keys escape a backslash as two since undecodable bytes became ``\\xNN``."""
    for table in ("files", "documents"):
        conn.execute(
            f"UPDATE {table} SET path = replace(path, '\\', '\\\\') WHERE instr(path, '\\') > 0"
        )


def _m005_unreadable_dirs(conn: sqlite3.Connection) -> None:
    """Inbox folders that cannot be listed now (see :mod:`store.files`)."""
    _script(
        conn,
        """
        CREATE TABLE unreadable_dirs (
            path TEXT PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            reason TEXT NOT NULL,
            since REAL NOT NULL
        );
        """,
    )


# Append only. Never edit a migration that has shipped; add a new one.
MIGRATIONS: list[tuple[str, Migration]] = [
    ("001_initial", _m001_initial),
    ("002_chunk_scores", _m002_chunk_scores),
    ("003_synthetic_chunks", _m003_synthetic_chunks),
    ("004_path_key_backslashes", _m004_path_key_backslashes),
    ("005_unreadable_dirs", _m005_unreadable_dirs),
]


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


def migrate(
    conn: sqlite3.Connection, migrations: list[tuple[str, Migration]] | None = None
) -> list[str]:
    """Apply pending migrations in order, each in its own transaction. Returns their names."""
    migrations = MIGRATIONS if migrations is None else migrations
    conn.execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    applied_now: list[str] = []
    for name, fn in migrations:
        # BEGIN IMMEDIATE serialises concurrent openers: only one applies each migration.
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone()
            if done:
                conn.execute("COMMIT")
                continue
            fn(conn)
            conn.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, time.time())
            )
            conn.execute("COMMIT")
            applied_now.append(name)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied_now


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
        conn = _connect_and_migrate(path, apply_migrations, cache_mib)
    except (sqlite3.Error, OSError) as exc:
        err = store_error(exc, path)
        if err is None:
            raise
        raise err from exc
    return Database(conn)


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
