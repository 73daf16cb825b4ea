"""The ``files`` table: every path ever seen in an inbox, with the stat it had.

A rescan compares a path's size and mtime with its row and skips an unchanged file
without opening it; the row also names the document the path carries, so a new version
of a path can supersede the old content, and a deleted or renamed path stops carrying it.
File statuses are their own vocabulary (a path can be a ``duplicate`` or ``gone``, a
document cannot), even where the words match a document's status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import sqlite_utils

INGESTED, DUPLICATE, QUARANTINED, SUPERSEDED = "ingested", "duplicate", "quarantined", "superseded"
# A path that is no longer on disk (deleted or renamed away); its document is kept.
GONE = "gone"


def file_row(db: sqlite_utils.Database, path: str) -> dict[str, Any] | None:
    """The row of ``path``, or None for a path never seen."""
    cur = db.conn.execute("SELECT * FROM files WHERE path = ?", (path,))
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c[0] for c in cur.description], row, strict=True))


def upsert_file(
    db: sqlite_utils.Database,
    path: str,
    *,
    track: str,
    size: int,
    mtime: float,
    content_hash: str | None,
    document_id: int | None,
    status: str,
    error: str | None = None,
) -> None:
    """Record what ``path`` was when last read (caller holds the transaction)."""
    db.conn.execute(
        "INSERT INTO files (path, track, size, mtime, content_hash, document_id, status, error,"
        " seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET"
        " track=excluded.track, size=excluded.size, mtime=excluded.mtime,"
        " content_hash=excluded.content_hash, document_id=excluded.document_id,"
        " status=excluded.status, error=excluded.error, seen_at=excluded.seen_at",
        (path, track, size, mtime, content_hash, document_id, status, error, time.time()),
    )


def live_stats_under(
    db: sqlite_utils.Database, root: str, track: str
) -> dict[str, tuple[int, float]]:
    """``path -> (size, mtime)`` of every live (not gone) path of ``track`` under ``root``.

    Paths under ``root`` sort between ``root/`` and ``root0`` (``0`` follows ``/``), so
    this is a range scan of the primary key, not a scan of the table.
    """
    prefix = root.rstrip(os.sep) + os.sep
    upper = prefix[:-1] + chr(ord(os.sep) + 1)
    return {
        row[0]: (row[1], row[2])
        for row in db.conn.execute(
            "SELECT path, size, mtime FROM files WHERE path >= ? AND path < ?"
            " AND track = ? AND status != ?",
            (prefix, upper, track, GONE),
        )
    }


def mark_files_gone(db: sqlite_utils.Database, paths: Iterable[str]) -> int:
    """Paths no longer on disk stop counting as carriers of their document.

    Without this a deleted path would keep "carrying" its content, and a new version that
    arrives under another path could never supersede it. The document itself stays:
    cleaning up the inbox does not un-learn anything. Returns rows changed.
    """
    now = time.time()
    changed = 0
    for path in paths:
        cur = db.conn.execute(
            "UPDATE files SET status = ?, seen_at = ? WHERE path = ? AND status != ?",
            (GONE, now, path, GONE),
        )
        changed += cur.rowcount
    return changed


def rename_file(db: sqlite_utils.Database, old: str, new: str) -> bool:
    """A file renamed inside the inbox keeps its history under the new path.

    So editing it after the rename supersedes its old content, as an edit in place would.
    Skipped (False) when the new path already has a live row of its own.
    """
    row = db.conn.execute("SELECT status FROM files WHERE path = ?", (new,)).fetchone()
    if row is not None and row[0] != GONE:
        return False
    if row is not None:
        db.conn.execute("DELETE FROM files WHERE path = ?", (new,))
    cur = db.conn.execute(
        "UPDATE files SET path = ?, seen_at = ? WHERE path = ? AND status != ?",
        (new, time.time(), old, GONE),
    )
    return cur.rowcount > 0


def other_files_of(db: sqlite_utils.Database, doc_id: int, path: str) -> int:
    """How many paths other than ``path`` still carry document ``doc_id``'s content."""
    row = db.conn.execute(
        "SELECT COUNT(*) FROM files WHERE document_id = ? AND path != ? AND status IN (?, ?)",
        (doc_id, path, INGESTED, DUPLICATE),
    ).fetchone()
    return int(row[0])


def count_with_status(db: sqlite_utils.Database, track: str, status: str) -> int:
    """Paths of ``track`` whose row has ``status`` (e.g. how many were duplicates)."""
    row = db.conn.execute(
        "SELECT COUNT(*) FROM files WHERE track = ? AND status = ?", (track, status)
    ).fetchone()
    return int(row[0])


# ------------------------------------------------------------------ unreadable folders
# Inbox folders a scan could not list (no permission, an I/O error), so their files are
# neither ingested nor marked gone. A row lives while the folder stays unreadable; its
# ``ingest.unreadable_dir`` event is written once, when the row is.


def unreadable_dirs_under(db: sqlite_utils.Database, root: str, track: str) -> dict[str, str]:
    """``path -> reason`` of the folders of ``track`` at or below ``root`` known unreadable."""
    prefix = root.rstrip(os.sep) + os.sep
    upper = prefix[:-1] + chr(ord(os.sep) + 1)
    return {
        row[0]: row[1]
        for row in db.conn.execute(
            "SELECT path, reason FROM unreadable_dirs WHERE track = ?"
            " AND (path = ? OR (path >= ? AND path < ?))",
            (track, root, prefix, upper),
        )
    }


def set_dir_unreadable(db: sqlite_utils.Database, path: str, track: str, reason: str) -> None:
    """Record (or update the reason of) an unreadable folder (caller holds the transaction)."""
    db.conn.execute(
        "INSERT INTO unreadable_dirs (path, track, reason, since) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(path) DO UPDATE SET track = excluded.track, reason = excluded.reason",
        (path, track, reason, time.time()),
    )


def set_dir_readable(db: sqlite_utils.Database, path: str) -> bool:
    """Forget a folder that can be listed again; returns whether it was known unreadable."""
    return db.conn.execute("DELETE FROM unreadable_dirs WHERE path = ?", (path,)).rowcount > 0


def count_unreadable_dirs(db: sqlite_utils.Database, track: str | None = None) -> int:
    """Inbox folders unreadable as of the last scan (``evergreen_inbox_unreadable_dirs``)."""
    if track is None:
        row = db.conn.execute("SELECT COUNT(*) FROM unreadable_dirs").fetchone()
    else:
        row = db.conn.execute(
            "SELECT COUNT(*) FROM unreadable_dirs WHERE track = ?", (track,)
        ).fetchone()
    return int(row[0])
