"""The audit log: every state change and decision, with its reasons."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlite_utils


def record(
    db: sqlite_utils.Database,
    kind: str,
    message: str,
    *,
    subject: str | None = None,
    track: str = "default",
    data: dict[str, Any] | None = None,
) -> int:
    """Append one event. ``kind`` is dotted (``stage.promoted``); ``message`` is for humans."""
    cur = db.conn.execute(
        "INSERT INTO events (ts, track, kind, subject, message, data) VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), track, kind, subject, message, json.dumps(data or {}, default=str)),
    )
    return int(cur.lastrowid or 0)


def recent(
    db: sqlite_utils.Database,
    *,
    kind_prefix: str | None = None,
    track: str | None = None,
    limit: int = 20,
) -> list[dict[str, Any]]:
    """Newest first. ``kind_prefix='ingest.'`` matches ``ingest.quarantined`` and friends."""
    where: list[str] = []
    args: list[Any] = []
    if kind_prefix:
        where.append("kind LIKE ?")
        args.append(kind_prefix.replace("%", "") + "%")
    if track:
        where.append("track = ?")
        args.append(track)
    sql = "SELECT * FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    rows = [dict(r) for r in db.query(sql, args)]
    for row in rows:
        row["data"] = json.loads(row["data"] or "{}")
    return rows
