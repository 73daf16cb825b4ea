"""Adapter versions (immutable dirs) and the per-track "current" pointer.

A promotion or rollback only moves the pointer here, with an event; the swapper then makes
vLLM agree with the pointer. Versions are ``v0001``, ``v0002``, ... per store.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlite_utils

from store import events

CANDIDATE, PROMOTED, REJECTED, RETIRED = "candidate", "promoted", "rejected", "retired"


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["metrics"] = json.loads(row.get("metrics") or "{}")
    return row


def next_version(db: sqlite_utils.Database) -> str:
    """The version after every registered adapter and every version a stage reserved.

    A stage reserves its version in its own row (``stages.output_version``, unique) when it
    is planned, so a version is never handed out twice, even when its stage failed. Call it
    in the transaction that creates the stage (:func:`daemon.training.plan.write_plan`).
    """
    row = db.conn.execute(
        "SELECT MAX(n) FROM ("
        " SELECT CAST(SUBSTR(version, 2) AS INTEGER) AS n FROM adapters WHERE version LIKE 'v%'"
        " UNION ALL SELECT CAST(SUBSTR(output_version, 2) AS INTEGER) FROM stages"
        " WHERE output_version LIKE 'v%')"
    ).fetchone()
    return f"v{int(row[0] or 0) + 1:04d}"


def register(
    db: sqlite_utils.Database,
    version: str,
    path: str,
    *,
    track: str = "default",
    parent_version: str | None = None,
    stage_id: int | None = None,
    metrics: dict[str, Any] | None = None,
    status: str = CANDIDATE,
) -> None:
    db.conn.execute(
        "INSERT INTO adapters (version, track, path, parent_version, stage_id, status, metrics,"
        " created_at) VALUES (?,?,?,?,?,?,?,?)",
        (
            version,
            track,
            path,
            parent_version,
            stage_id,
            status,
            json.dumps(metrics or {}),
            time.time(),
        ),
    )
    events.record(
        db,
        "adapter.registered",
        f"adapter {version} registered ({status})",
        subject=version,
        track=track,
        data={"parent": parent_version, "stage": stage_id},
    )


def get(db: sqlite_utils.Database, version: str) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM adapters WHERE version = ?", [version]))
    return _decode(dict(rows[0])) if rows else None


def list_adapters(db: sqlite_utils.Database, track: str) -> list[dict[str, Any]]:
    return [
        _decode(dict(r))
        for r in db.query("SELECT * FROM adapters WHERE track = ? ORDER BY version", [track])
    ]


def set_status(db: sqlite_utils.Database, version: str, status: str) -> None:
    db.conn.execute("UPDATE adapters SET status = ? WHERE version = ?", (status, version))


def current(db: sqlite_utils.Database, track: str = "default") -> str | None:
    row = db.conn.execute(
        "SELECT version FROM current_adapter WHERE track = ?", (track,)
    ).fetchone()
    return row[0] if row else None


def set_current(
    db: sqlite_utils.Database, version: str | None, *, track: str = "default", reason: str
) -> str | None:
    """Move the pointer; returns the previous version. Always recorded as an event."""
    previous = current(db, track)
    now = time.time()
    db.conn.execute(
        "INSERT INTO current_adapter (track, version, updated_at) VALUES (?,?,?)"
        " ON CONFLICT(track) DO UPDATE SET version = excluded.version,"
        " updated_at = excluded.updated_at",
        (track, version, now),
    )
    if version is not None:
        db.conn.execute(
            "UPDATE adapters SET status = ?, promoted_at = COALESCE(promoted_at, ?)"
            " WHERE version = ?",
            (PROMOTED, now, version),
        )
    events.record(
        db,
        "adapter.current",
        f"current adapter {previous} -> {version}: {reason}",
        subject=version,
        track=track,
        data={"previous": previous, "reason": reason},
    )
    return previous


def previous_promoted(db: sqlite_utils.Database, track: str, before: str) -> str | None:
    """The promoted version just before ``before`` (what ``rollback`` goes back to)."""
    row = db.conn.execute(
        "SELECT version FROM adapters WHERE track = ? AND status = ? AND version < ?"
        " ORDER BY version DESC LIMIT 1",
        (track, PROMOTED, before),
    ).fetchone()
    return row[0] if row else None
