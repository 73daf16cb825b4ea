"""Documents, the files they came from, their chunks, and the replay buffer.

A *document* is one distinct content (unique per track by content hash); a *file* row
remembers each path and the stat it had, so a rescan skips unchanged files without reading
them and the same content under two names is stored once. Chunks are what training reads.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from store import kv

# Document statuses.
INGESTED, TRAINED, SUPERSEDED, QUARANTINED = "ingested", "trained", "superseded", "quarantined"
# File statuses (a file that repeats another file's content is a 'duplicate').
DUPLICATE = "duplicate"
# A path that is no longer on disk (deleted or renamed away); its document is kept.
GONE = "gone"
# Chunk statuses.
PENDING, DROPPED = "pending", "dropped"


@dataclass(frozen=True)
class ChunkIn:
    """A chunk as the ingest pipeline produces it."""

    text: str
    n_tokens: int
    split: str  # train | holdout
    kind: str = "text"  # text | chat


def file_row(db: sqlite_utils.Database, path: str) -> dict[str, Any] | None:
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
    db.conn.execute(
        "INSERT INTO files (path, track, size, mtime, content_hash, document_id, status, error,"
        " seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET"
        " track=excluded.track, size=excluded.size, mtime=excluded.mtime,"
        " content_hash=excluded.content_hash, document_id=excluded.document_id,"
        " status=excluded.status, error=excluded.error, seen_at=excluded.seen_at",
        (path, track, size, mtime, content_hash, document_id, status, error, time.time()),
    )


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


def document_by_hash(
    db: sqlite_utils.Database, track: str, content_hash: str
) -> dict[str, Any] | None:
    cur = db.conn.execute(
        "SELECT id, status FROM documents WHERE track = ? AND content_hash = ?",
        (track, content_hash),
    )
    row = cur.fetchone()
    return {"id": row[0], "status": row[1]} if row else None


def insert_document(
    db: sqlite_utils.Database,
    *,
    track: str,
    path: str,
    content_hash: str,
    size: int,
    mtime: float,
    fmt: str,
    status: str = INGESTED,
    error: str | None = None,
    chunks: Sequence[ChunkIn] = (),
) -> int:
    """Insert a document and its chunks (caller holds the transaction)."""
    now = time.time()
    cur = db.conn.execute(
        "INSERT INTO documents (track, path, content_hash, size, mtime, format, status, error,"
        " n_chunks, n_tokens, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            track,
            path,
            content_hash,
            size,
            mtime,
            fmt,
            status,
            error,
            len(chunks),
            sum(c.n_tokens for c in chunks),
            now,
            now,
        ),
    )
    doc_id = int(cur.lastrowid or 0)
    if chunks:
        db.conn.executemany(
            "INSERT INTO chunks (track, document_id, seq, kind, text, n_tokens, split, status,"
            " created_at) VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (track, doc_id, i, c.kind, c.text, c.n_tokens, c.split, PENDING, now)
                for i, c in enumerate(chunks)
            ],
        )
    return doc_id


def revive_document(db: sqlite_utils.Database, doc_id: int, path: str) -> None:
    """Content that was superseded came back: its chunks become pending again."""
    now = time.time()
    db.conn.execute(
        "UPDATE documents SET status = ?, path = ?, updated_at = ? WHERE id = ?",
        (INGESTED, path, now, doc_id),
    )
    db.conn.execute(
        "UPDATE chunks SET status = CASE WHEN stage_id IS NULL THEN ? ELSE 'trained' END"
        " WHERE document_id = ? AND status = ?",
        (PENDING, doc_id, SUPERSEDED),
    )


def supersede_document(db: sqlite_utils.Database, doc_id: int) -> None:
    """Mark a document and all its chunks superseded, and drop them from the replay buffer."""
    db.conn.execute(
        "UPDATE documents SET status = ?, updated_at = ? WHERE id = ? AND status != ?",
        (SUPERSEDED, time.time(), doc_id, QUARANTINED),
    )
    db.conn.execute(
        "DELETE FROM replay_buffer WHERE chunk_id IN (SELECT id FROM chunks WHERE document_id = ?)",
        (doc_id,),
    )
    db.conn.execute("UPDATE chunks SET status = ? WHERE document_id = ?", (SUPERSEDED, doc_id))


def other_files_of(db: sqlite_utils.Database, doc_id: int, path: str) -> int:
    """How many other paths still carry this document's content."""
    row = db.conn.execute(
        "SELECT COUNT(*) FROM files WHERE document_id = ? AND path != ? AND status IN (?, ?)",
        (doc_id, path, INGESTED, DUPLICATE),
    ).fetchone()
    return int(row[0])


def status_counts(db: sqlite_utils.Database, track: str) -> dict[str, int]:
    rows = db.conn.execute(
        "SELECT status, COUNT(*) FROM documents WHERE track = ? GROUP BY status", (track,)
    ).fetchall()
    counts = {INGESTED: 0, TRAINED: 0, SUPERSEDED: 0, QUARANTINED: 0}
    counts.update({r[0]: int(r[1]) for r in rows})
    dup = db.conn.execute(
        "SELECT COUNT(*) FROM files WHERE track = ? AND status = ?", (track, DUPLICATE)
    ).fetchone()
    counts[DUPLICATE] = int(dup[0])
    return counts


def quarantine_counts(db: sqlite_utils.Database, track: str) -> dict[str, int]:
    """Quarantined documents by reason class (the error text up to the first ':')."""
    rows = db.conn.execute(
        "SELECT error FROM documents WHERE track = ? AND status = ?", (track, QUARANTINED)
    ).fetchall()
    out: dict[str, int] = {}
    for (error,) in rows:
        reason = (error or "unknown").split(":")[0]
        out[reason] = out.get(reason, 0) + 1
    return out


def pending_tokens(db: sqlite_utils.Database, track: str) -> int:
    row = db.conn.execute(
        "SELECT COALESCE(SUM(n_tokens), 0) FROM chunks WHERE track = ? AND status = ?"
        " AND split = 'train'",
        (track, PENDING),
    ).fetchone()
    return int(row[0])


def chunks_by_ids(db: sqlite_utils.Database, ids: Iterable[int]) -> list[dict[str, Any]]:
    """Chunks in the order of ``ids`` (missing ids are skipped)."""
    ids = list(ids)
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        for row in db.query(f"SELECT * FROM chunks WHERE id IN ({marks})", part):
            out[int(row["id"])] = dict(row)
    return [out[i] for i in ids if i in out]


def pending_chunks(
    db: sqlite_utils.Database, track: str, *, split: str = "train"
) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in db.query(
            "SELECT * FROM chunks WHERE track = ? AND status = ? AND split = ? ORDER BY id",
            [track, PENDING, split],
        )
    ]


def mark_trained(
    db: sqlite_utils.Database,
    chunk_ids: Sequence[int],
    stage_id: int,
    losses: dict[int, float] | None = None,
) -> None:
    """New chunks of a promoted stage: trained, with the loss they had when learned."""
    losses = losses or {}
    db.conn.executemany(
        "UPDATE chunks SET status = 'trained', stage_id = ?, learned_loss = ? WHERE id = ?",
        [(stage_id, losses.get(cid), cid) for cid in chunk_ids],
    )
    db.conn.execute(
        "UPDATE documents SET status = 'trained', updated_at = ? WHERE status = ? AND id IN"
        " (SELECT document_id FROM chunks WHERE stage_id = ?) AND NOT EXISTS (SELECT 1 FROM"
        " chunks c WHERE c.document_id = documents.id AND c.status = ? AND c.split = 'train')",
        (time.time(), INGESTED, stage_id, PENDING),
    )


def replay_add(
    db: sqlite_utils.Database,
    track: str,
    chunk_ids: Sequence[int],
    *,
    capacity: int,
    stage_id: int | None = None,
    rng: random.Random | None = None,
) -> int:
    """Offer chunks to the bounded replay buffer by reservoir sampling (Algorithm R).

    Every chunk ever offered has the same chance ``capacity / seen`` of being in the buffer,
    so old stages stay represented however much data arrives later. Returns chunks kept.
    """
    rng = rng or random.Random()
    key = f"replay_seen:{track}"
    seen = int(kv.get(db, key, "0") or 0)
    size = int(
        db.conn.execute("SELECT COUNT(*) FROM replay_buffer WHERE track = ?", (track,)).fetchone()[
            0
        ]
    )
    kept = 0
    now = time.time()
    for cid in chunk_ids:
        seen += 1
        if size < capacity:
            db.conn.execute(
                "INSERT OR IGNORE INTO replay_buffer (track, chunk_id, stage_id, added_at)"
                " VALUES (?,?,?,?)",
                (track, cid, stage_id, now),
            )
            size += 1
            kept += 1
            continue
        j = rng.randrange(seen)
        if j < capacity:
            victim = db.conn.execute(
                "SELECT id FROM replay_buffer WHERE track = ? ORDER BY id LIMIT 1 OFFSET ?",
                (track, j),
            ).fetchone()
            if victim:
                db.conn.execute(
                    "UPDATE OR IGNORE replay_buffer SET chunk_id = ?, stage_id = ?, added_at = ?"
                    " WHERE id = ?",
                    (cid, stage_id, now, victim[0]),
                )
                kept += 1
    kv.put(db, key, str(seen))
    return kept


def replay_rows(db: sqlite_utils.Database, track: str) -> list[dict[str, Any]]:
    """The replay buffer joined with chunk facts the replay policies need."""
    return [
        dict(r)
        for r in db.query(
            "SELECT r.chunk_id, r.weight, r.stage_id, r.added_at, c.document_id, c.n_tokens,"
            " c.learned_loss, c.kind, d.path FROM replay_buffer r JOIN chunks c ON c.id = r.chunk_id"
            " JOIN documents d ON d.id = c.document_id WHERE r.track = ? ORDER BY r.id",
            [track],
        )
    ]


def put_scores(
    db: sqlite_utils.Database, adapter_version: str | None, losses: dict[int, float]
) -> None:
    """Record per-chunk mean token loss under ``adapter_version`` (None/'' = base model)."""
    now = time.time()
    db.conn.executemany(
        "INSERT INTO chunk_scores (chunk_id, adapter_version, loss, scored_at) VALUES (?,?,?,?)"
        " ON CONFLICT(chunk_id, adapter_version) DO UPDATE SET loss = excluded.loss,"
        " scored_at = excluded.scored_at",
        [(cid, adapter_version or "", loss, now) for cid, loss in losses.items()],
    )


def scores(
    db: sqlite_utils.Database, adapter_version: str | None, chunk_ids: Iterable[int]
) -> dict[int, float]:
    """Known losses of ``chunk_ids`` under ``adapter_version``; unscored ids are absent."""
    ids = list(chunk_ids)
    out: dict[int, float] = {}
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        for cid, loss in db.conn.execute(
            f"SELECT chunk_id, loss FROM chunk_scores WHERE adapter_version = ?"
            f" AND chunk_id IN ({marks})",
            [adapter_version or "", *part],
        ):
            out[int(cid)] = float(loss)
    return out


# --- used by policies (trigger state, selection, rejected stages) -----------------------
def oldest_pending_train_at(db: sqlite_utils.Database, track: str) -> float | None:
    """Creation time of the oldest pending *train* chunk (holdout chunks never train)."""
    row = db.conn.execute(
        "SELECT MIN(created_at) FROM chunks WHERE track = ? AND status = ? AND split = 'train'",
        (track, PENDING),
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def learned_holdout(db: sqlite_utils.Database, track: str) -> list[dict[str, Any]]:
    """Holdout chunks of documents already learned: the "known knowledge" yardstick."""
    return [
        dict(r)
        for r in db.query(
            "SELECT c.id, c.n_tokens, c.document_id FROM chunks c JOIN documents d"
            " ON d.id = c.document_id WHERE c.track = ? AND c.split = 'holdout'"
            " AND (c.status = 'trained' OR d.status = 'trained') ORDER BY c.id",
            [track],
        )
    ]


def bump_attempts(db: sqlite_utils.Database, chunk_ids: Sequence[int]) -> dict[int, int]:
    """Count one more failed attempt for still-pending chunks; returns id -> attempts."""
    out: dict[int, int] = {}
    for start in range(0, len(chunk_ids), 500):
        part = list(chunk_ids[start : start + 500])
        marks = ",".join("?" * len(part))
        db.conn.execute(
            f"UPDATE chunks SET attempts = attempts + 1 WHERE status = ? AND id IN ({marks})",
            [PENDING, *part],
        )
        for cid, attempts in db.conn.execute(
            f"SELECT id, attempts FROM chunks WHERE status = ? AND id IN ({marks})",
            [PENDING, *part],
        ):
            out[int(cid)] = int(attempts)
    return out


def set_aside(db: sqlite_utils.Database, chunk_ids: Sequence[int]) -> None:
    """Pending chunks that will not be retried become 'dropped' (kept, never deleted)."""
    db.conn.executemany(
        "UPDATE chunks SET status = ? WHERE id = ? AND status = ?",
        [(DROPPED, cid, PENDING) for cid in chunk_ids],
    )


def pending_chunk_facts(
    db: sqlite_utils.Database, track: str, *, split: str = "train"
) -> list[dict[str, Any]]:
    """Pending chunks without their text: what policies weigh, cheap on a big inbox."""
    return [
        dict(r)
        for r in db.query(
            "SELECT id, document_id, n_tokens, created_at, attempts FROM chunks"
            " WHERE track = ? AND status = ? AND split = ? ORDER BY id",
            [track, PENDING, split],
        )
    ]
