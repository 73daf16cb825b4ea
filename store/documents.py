"""Documents, their chunks, chunk scores and the replay buffer.

A *document* is one distinct content (unique per track by content hash), so the same
content under two names is stored once; the paths that carry it live in
:mod:`store.files`. Chunks are what training reads.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from store import files, kv

# Document statuses.
INGESTED, TRAINED, SUPERSEDED, QUARANTINED = "ingested", "trained", "superseded", "quarantined"
# Chunk statuses.
PENDING, DROPPED = "pending", "dropped"


@dataclass(frozen=True, slots=True)  # no __dict__: a big file has 10^5 chunks
class ChunkIn:
    """A chunk as the ingest pipeline produces it."""

    text: str
    n_tokens: int
    split: str  # train | holdout
    kind: str = "text"  # text | chat


def document_by_hash(
    db: sqlite_utils.Database, track: str, content_hash: str
) -> dict[str, Any] | None:
    """``{"id", "status", "error"}`` of the document with this content, or None."""
    row = db.conn.execute(
        "SELECT id, status, error FROM documents WHERE track = ? AND content_hash = ?",
        (track, content_hash),
    ).fetchone()
    return {"id": int(row[0]), "status": row[1], "error": row[2]} if row else None


def document_status(db: sqlite_utils.Database, doc_id: int) -> str | None:
    """The status of document ``doc_id``, or None when there is no such document."""
    row = db.conn.execute("SELECT status FROM documents WHERE id = ?", (doc_id,)).fetchone()
    return str(row[0]) if row else None


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
            (  # a generator: a big document's rows are not built all at once
                (track, doc_id, i, c.kind, c.text, c.n_tokens, c.split, PENDING, now)
                for i, c in enumerate(chunks)
            ),
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


def status_counts(db: sqlite_utils.Database, track: str) -> dict[str, int]:
    rows = db.conn.execute(
        "SELECT status, COUNT(*) FROM documents WHERE track = ? GROUP BY status", (track,)
    ).fetchall()
    counts = {INGESTED: 0, TRAINED: 0, SUPERSEDED: 0, QUARANTINED: 0}
    counts.update({r[0]: int(r[1]) for r in rows})
    counts[files.DUPLICATE] = files.count_with_status(db, track, files.DUPLICATE)
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
    return list(iter_chunks_by_ids(db, ids))


def iter_chunks_by_ids(db: sqlite_utils.Database, ids: Iterable[int]) -> Iterator[dict[str, Any]]:
    """Chunks in the order of ``ids`` (missing ids are skipped), 500 rows in memory at most."""
    ids = list(ids)
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        rows = {
            int(row["id"]): dict(row)
            for row in db.query(f"SELECT * FROM chunks WHERE id IN ({marks})", part)
        }
        yield from (rows[i] for i in part if i in rows)


def chunks_sha256(db: sqlite_utils.Database, ids: Iterable[int]) -> str:
    """SHA-256 over the id, kind and text of chunks ``ids`` in order (missing ids skipped).

    A stage records it for its new and replay data, so a plan names exactly the bytes it
    trained on. Streams the texts rather than loading a whole stage's chunks at once.
    """
    h = hashlib.sha256()
    for c in iter_chunks_by_ids(db, ids):
        h.update(f"{c['id']}\x1f{c['kind']}\x1f".encode())
        h.update(c["text"].encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()


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
    slots: list[int] | None = None  # buffer row ids in id order, read once when first needed
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
            if slots is None:  # the j-th row by id; one read, not an OFFSET scan per victim
                slots = [
                    int(r[0])
                    for r in db.conn.execute(
                        "SELECT id FROM replay_buffer WHERE track = ? ORDER BY id", (track,)
                    )
                ]
            if j < len(slots):
                db.conn.execute(
                    "UPDATE OR IGNORE replay_buffer SET chunk_id = ?, stage_id = ?, added_at = ?"
                    " WHERE id = ?",
                    (cid, stage_id, now, slots[j]),
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
