"""A tiny key/value table for counters that must survive restarts (reservoir count, ...)."""

from __future__ import annotations

import sqlite_utils


def get(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    row = db.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def put(db: sqlite_utils.Database, key: str, value: str) -> None:
    db.conn.execute(
        "INSERT INTO kv (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def incr(db: sqlite_utils.Database, key: str, by: int = 1) -> int:
    """Add ``by`` and return the new value (call inside a transaction for atomicity)."""
    current = int(get(db, key, "0") or 0) + by
    put(db, key, str(current))
    return current
