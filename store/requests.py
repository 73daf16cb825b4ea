"""Operator requests the running daemon performs (``evergreen promote``/``rollback``).

The daemon holds the state dir's lock, so a CLI command that writes cannot do its work
itself while it runs; it files a request here and waits for the answer. A request is
``pending`` until the daemon claims it (``running``), then ``done`` or ``failed`` with
a one-line ``message``. One not claimed by its ``deadline`` is ``expired`` and never
performed late. Every outcome is also an event (``request.done``, ``request.failed``,
``request.expired``).

The daemon performs what it claims before it claims again, and only one daemon runs per
state dir, so a request still ``running`` when the daemon claims is one a previous daemon
died performing (SIGKILL, OOM): it is answered ``failed`` (``INTERRUPTED``) then, so the
CLI waiting on it, and ``evergreen adapters``, see the outcome instead of a request that
runs for ever.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlite_utils

from store import events
from store.db import transaction

PENDING, RUNNING, DONE, FAILED, EXPIRED = "pending", "running", "done", "failed", "expired"
FINISHED = (DONE, FAILED, EXPIRED)
INTERRUPTED = (
    "interrupted: the daemon stopped before recording its outcome (killed?); see"
    " `evergreen adapters` for the current adapter"
)


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["args"] = json.loads(row["args"] or "{}")
    return row


def submit(
    db: sqlite_utils.Database,
    kind: str,
    args: dict[str, Any],
    *,
    track: str = "default",
    timeout_s: float,
    now: float | None = None,
) -> int:
    """File a request; the daemon must start it within ``timeout_s``. Returns its id."""
    now = time.time() if now is None else now
    cur = db.conn.execute(
        "INSERT INTO requests (track, kind, args, status, created_at, deadline)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (track, kind, json.dumps(args), PENDING, now, now + timeout_s),
    )
    return int(cur.lastrowid or 0)


def get(db: sqlite_utils.Database, request_id: int) -> dict[str, Any] | None:
    rows = list(db.query("SELECT * FROM requests WHERE id = ?", [request_id]))
    return _decode(dict(rows[0])) if rows else None


def claim_next(
    db: sqlite_utils.Database, *, track: str = "default", now: float | None = None
) -> dict[str, Any] | None:
    """Fail what a dead daemon left ``running``, expire the pending requests past their
    deadline, then mark the oldest pending one ``running`` and return it (None when there
    is none). Called every second by the daemon's main loop, between requests it performs,
    so with nothing pending it only reads (no write lock to wait for behind a long ingest
    transaction)."""
    now = time.time() if now is None else now
    waiting = db.conn.execute(  # a read first: the idle main loop never queues for the lock
        "SELECT 1 FROM requests WHERE track = ? AND status IN (?, ?) LIMIT 1",
        (track, PENDING, RUNNING),
    ).fetchone()
    if waiting is None:
        return None
    with transaction(db):
        orphaned = db.conn.execute(
            "SELECT id FROM requests WHERE track = ? AND status = ?", (track, RUNNING)
        ).fetchall()
        for (request_id,) in orphaned:
            _finish(db, int(request_id), FAILED, INTERRUPTED, now)
        stale = db.conn.execute(
            "SELECT id, kind FROM requests WHERE track = ? AND status = ? AND deadline < ?",
            (track, PENDING, now),
        ).fetchall()
        for request_id, kind in stale:
            _finish(db, int(request_id), EXPIRED, f"{kind}: not started before its deadline", now)
        row = db.conn.execute(
            "SELECT id FROM requests WHERE track = ? AND status = ? ORDER BY id LIMIT 1",
            (track, PENDING),
        ).fetchone()
        if row is None:
            return None
        db.conn.execute(
            "UPDATE requests SET status = ?, claimed_at = ? WHERE id = ?", (RUNNING, now, row[0])
        )
    return get(db, int(row[0]))


def finish(db: sqlite_utils.Database, request_id: int, ok: bool, message: str) -> None:
    """Record the outcome of a claimed request, with an event."""
    with transaction(db):
        _finish(db, request_id, DONE if ok else FAILED, message, time.time())


def expire_if_pending(db: sqlite_utils.Database, request_id: int, message: str) -> bool:
    """Expire a request nobody claimed (the CLI gave up waiting); False if it was claimed."""
    with transaction(db):
        row = db.conn.execute("SELECT status FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None or row[0] != PENDING:
            return False
        _finish(db, request_id, EXPIRED, message, time.time())
    return True


def _finish(
    db: sqlite_utils.Database, request_id: int, status: str, message: str, now: float
) -> None:
    db.conn.execute(
        "UPDATE requests SET status = ?, message = ?, finished_at = ? WHERE id = ?",
        (status, message, now, request_id),
    )
    row = db.conn.execute(
        "SELECT track, kind, args FROM requests WHERE id = ?", (request_id,)
    ).fetchone()
    track, kind, args = row
    events.record(
        db,
        f"request.{status}",
        f"{kind} request {request_id} {status}: {message}",
        subject=str(request_id),
        track=track,
        data={"kind": kind, "args": json.loads(args or "{}")},
    )
