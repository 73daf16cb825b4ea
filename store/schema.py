"""The schema: ordered migrations, each applied once in its own transaction.

Append only: a migration that has shipped is never edited, a change is a new one. Kept
apart from :mod:`store.db` (connections and transactions) because the DDL is long and
reads top to bottom.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

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


def _m006_stage_output_version(conn: sqlite3.Connection) -> None:
    """A stage reserves its adapter version in its own row, unique across the store.

    Older stores reused a failed stage's version; only the newest stage that planned a
    version keeps it here, so the unique index holds.
    """
    _script(
        conn,
        """
        ALTER TABLE stages ADD COLUMN output_version TEXT;
        UPDATE stages SET output_version = json_extract(plan, '$.output_version')
         WHERE id IN (SELECT MAX(id) FROM stages
                       WHERE json_valid(plan) AND json_extract(plan, '$.output_version') LIKE 'v%'
                       GROUP BY json_extract(plan, '$.output_version'));
        CREATE UNIQUE INDEX stages_output_version ON stages(output_version);
        """,
    )


def _m007_requests(conn: sqlite3.Connection) -> None:
    """Operator requests (``evergreen promote``/``rollback``) that the running daemon
    performs (see :mod:`store.requests`)."""
    _script(
        conn,
        """
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            track TEXT NOT NULL DEFAULT 'default',
            kind TEXT NOT NULL,            -- promote | rollback
            args TEXT NOT NULL,            -- JSON
            status TEXT NOT NULL,          -- pending | running | done | failed | expired
            message TEXT,
            created_at REAL NOT NULL,
            deadline REAL NOT NULL,        -- not started by then: expired, never run late
            claimed_at REAL,
            finished_at REAL
        );
        CREATE INDEX requests_pending ON requests(track, status, id);
        """,
    )


# Append only. Never edit a migration that has shipped; add a new one.
MIGRATIONS: list[tuple[str, Migration]] = [
    ("001_initial", _m001_initial),
    ("002_chunk_scores", _m002_chunk_scores),
    ("003_synthetic_chunks", _m003_synthetic_chunks),
    ("004_path_key_backslashes", _m004_path_key_backslashes),
    ("005_unreadable_dirs", _m005_unreadable_dirs),
    ("006_stage_output_version", _m006_stage_output_version),
    ("007_requests", _m007_requests),
]


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
