"""Training stages: plan -> running -> trained -> evaluated -> promoted | rejected | failed.

The plan is written before the stage subprocess starts and is the only thing it reads;
progress and results are written back here so the parent (and metrics) can see them.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlite_utils

from store import events

PLANNED, RUNNING, TRAINED, EVALUATED = "planned", "running", "trained", "evaluated"
PROMOTED, REJECTED, FAILED = "promoted", "rejected", "failed"
FINAL = (PROMOTED, REJECTED, FAILED)
ACTIVE = (PLANNED, RUNNING, TRAINED, EVALUATED)

_JSON_COLUMNS = ("plan", "metrics", "progress")


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for col in _JSON_COLUMNS:
        row[col] = json.loads(row.get(col) or "{}")
    return row


def create(
    db: sqlite_utils.Database,
    plan: dict[str, Any],
    *,
    track: str = "default",
    parent_version: str | None = None,
    output_version: str | None = None,
) -> int:
    """A planned stage; ``output_version`` reserves its adapter version (unique: a second
    stage for the same version raises ``sqlite3.IntegrityError``)."""
    now = time.time()
    cur = db.conn.execute(
        "INSERT INTO stages (track, status, plan, parent_version, output_version, created_at)"
        " VALUES (?,?,?,?,?,?)",
        (track, PLANNED, json.dumps(plan), parent_version, output_version, now),
    )
    stage_id = int(cur.lastrowid or 0)
    events.record(
        db,
        "stage.planned",
        f"stage {stage_id} planned",
        subject=str(stage_id),
        track=track,
        data={
            "n_new": len(plan.get("new_chunk_ids", [])),
            "n_replay": len(plan.get("replay_chunk_ids", [])),
            "parent": parent_version,
        },
    )
    return stage_id


def set_plan(db: sqlite_utils.Database, stage_id: int, plan: dict[str, Any] | str) -> None:
    """Replace a planned stage's plan (a dict, or JSON already serialised by a contract).

    The planner first creates the row to learn the stage id, then writes the plan again
    with the paths that name it (``stage_dir``).
    """
    raw = plan if isinstance(plan, str) else json.dumps(plan)
    db.conn.execute("UPDATE stages SET plan = ? WHERE id = ?", (raw, stage_id))


def get(db: sqlite_utils.Database, stage_id: int) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM stages WHERE id = ?", [stage_id]))
    return _decode(dict(rows[0])) if rows else None


def set_status(
    db: sqlite_utils.Database,
    stage_id: int,
    status: str,
    *,
    reason: str | None = None,
    **fields: Any,
) -> None:
    """Move a stage to ``status`` and record the transition (with reason) as an event."""
    sets = ["status = ?"]
    args: list[Any] = [status]
    if reason is not None:
        sets.append("reason = ?")
        args.append(reason)
    if status == RUNNING and "started_at" not in fields:
        fields["started_at"] = time.time()
    if status in FINAL:
        fields.setdefault("finished_at", time.time())
    for key, value in fields.items():
        sets.append(f"{key} = ?")
        args.append(json.dumps(value) if key in _JSON_COLUMNS else value)
    args.append(stage_id)
    db.conn.execute(f"UPDATE stages SET {', '.join(sets)} WHERE id = ?", args)
    row = db.conn.execute("SELECT track FROM stages WHERE id = ?", (stage_id,)).fetchone()
    events.record(
        db,
        f"stage.{status}",
        f"stage {stage_id} {status}" + (f": {reason}" if reason else ""),
        subject=str(stage_id),
        track=row[0] if row else "default",
    )


def update_progress(db: sqlite_utils.Database, stage_id: int, progress: dict[str, Any]) -> None:
    """Called often by the trainer: no event, just the row and a heartbeat."""
    db.conn.execute(
        "UPDATE stages SET progress = ?, heartbeat_at = ? WHERE id = ?",
        (json.dumps(progress), time.time(), stage_id),
    )


def merge_metrics(db: sqlite_utils.Database, stage_id: int, metrics: dict[str, Any]) -> None:
    row = get(db, stage_id)
    merged = {**(row["metrics"] if row else {}), **metrics}
    db.conn.execute("UPDATE stages SET metrics = ? WHERE id = ?", (json.dumps(merged), stage_id))


def active(db: sqlite_utils.Database, track: str | None = None) -> list[dict[str, Any]]:
    """Stages not yet in a final state (at most one should exist per track)."""
    marks = ",".join("?" * len(ACTIVE))
    sql = f"SELECT * FROM stages WHERE status IN ({marks})"
    args: list[Any] = list(ACTIVE)
    if track:
        sql += " AND track = ?"
        args.append(track)
    return [_decode(dict(r)) for r in db.query(sql + " ORDER BY id", args)]


def latest(
    db: sqlite_utils.Database, track: str, *, status: str | None = None
) -> dict[str, Any] | None:
    sql = "SELECT * FROM stages WHERE track = ?"
    args: list[Any] = [track]
    if status:
        sql += " AND status = ?"
        args.append(status)
    rows = list(db.query(sql + " ORDER BY id DESC LIMIT 1", args))
    return _decode(dict(rows[0])) if rows else None


def list_stages(db: sqlite_utils.Database, track: str, limit: int = 50) -> list[dict[str, Any]]:
    return [
        _decode(dict(r))
        for r in db.query(
            "SELECT * FROM stages WHERE track = ? ORDER BY id DESC LIMIT ?", [track, limit]
        )
    ]


def outcome_counts(db: sqlite_utils.Database, track: str) -> dict[str, int]:
    counts = dict.fromkeys(FINAL, 0)
    for status, n in db.conn.execute(
        "SELECT status, COUNT(*) FROM stages WHERE track = ? GROUP BY status", (track,)
    ):
        counts[status] = int(n)
    return counts


def rejected_since_promotion(db: sqlite_utils.Database, track: str) -> list[dict[str, Any]]:
    """Rejected stages of ``track`` after its last promoted one, oldest first: the run of
    rejections a retry adapts to (a promotion starts a new run)."""
    row = db.conn.execute(
        "SELECT COALESCE(MAX(id), 0) FROM stages WHERE track = ? AND status = ?",
        (track, PROMOTED),
    ).fetchone()
    return [
        _decode(dict(r))
        for r in db.query(
            "SELECT * FROM stages WHERE track = ? AND status = ? AND id > ? ORDER BY id",
            [track, REJECTED, int(row[0])],
        )
    ]
