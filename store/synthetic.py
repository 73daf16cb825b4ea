"""Synthetic study text with lineage: rewrites of user chunks, never user data themselves.

A synthetic text is stored as a ``chunks`` row with ``split = 'synthetic'`` under its
source chunk's document, plus a ``chunk_lineage`` row (source chunk, method, variant,
content hash). Why a chunk row rather than a table of its own: a stage reads its data by
chunk id (:func:`store.documents.chunks_by_ids`), so synthetic text trains through the
same path as user text with no change to the stage; and every query that means user
data already filters ``split = 'train'`` or ``'holdout'``, so synthetic text is never
counted as a document, never adds pending tokens or staleness, and is never holdout,
retention or general evaluation data.

Lineage follows the source for free: :func:`store.documents.supersede_document` marks
every chunk of the document superseded (synthetic ones included, and drops them from
the replay buffer), and :func:`store.documents.revive_document` brings them back with
their source. The foreign keys cascade if a chunk row is ever deleted.

Deduplication is by SHA-256 of the text among *live* synthetic chunks of the track, so a
new version of a document (whose unchanged chunks rewrite to the same text) gets its
own synthetic copies once the old version is superseded.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from store.db import savepoint

SYNTHETIC = "synthetic"  # the chunks.split of synthetic text
_LIVE_STATUSES = ("pending", "trained")  # superseded and dropped chunks are gone
_BATCH = 500


@dataclass(frozen=True)
class SyntheticIn:
    """One synthetic text as a method produced it, already filtered and normalised."""

    text: str
    n_tokens: int
    variant: str


@dataclass
class Added:
    """What :func:`add` kept (new chunk ids) and why it dropped the rest."""

    ids: list[int] = field(default_factory=list)
    duplicates: int = 0
    source_gone: bool = False


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unaugmented(
    db: sqlite_utils.Database, track: str, method: str, *, limit: int
) -> list[dict[str, Any]]:
    """Pending train chunks not yet augmented with ``method``, oldest first, at most ``limit``."""
    return [
        dict(r)
        for r in db.query(
            "SELECT c.id, c.track, c.document_id, c.seq, c.kind, c.text, c.n_tokens"
            " FROM chunks c WHERE c.track = ? AND c.status = 'pending' AND c.split = 'train'"
            " AND NOT EXISTS (SELECT 1 FROM augmentations a WHERE a.source_chunk_id = c.id"
            " AND a.method = ?) ORDER BY c.id LIMIT ?",
            [track, method, limit],
        )
    ]


def _live_hash(db: sqlite_utils.Database, track: str, digest: str) -> bool:
    row = db.conn.execute(
        "SELECT 1 FROM chunk_lineage l JOIN chunks c ON c.id = l.chunk_id WHERE l.track = ?"
        " AND l.content_hash = ? AND c.status IN (?, ?) LIMIT 1",
        (track, digest, *_LIVE_STATUSES),
    ).fetchone()
    return row is not None


def _in_document(db: sqlite_utils.Database, doc_id: int, text: str) -> bool:
    """The document already says exactly this in one of its own chunks."""
    row = db.conn.execute(
        "SELECT 1 FROM chunks WHERE document_id = ? AND split != ? AND text = ? LIMIT 1",
        (doc_id, SYNTHETIC, text),
    ).fetchone()
    return row is not None


def add(
    db: sqlite_utils.Database, source_chunk_id: int, method: str, items: Sequence[SyntheticIn]
) -> Added:
    """Store ``items`` as synthetic chunks of ``source_chunk_id`` (deduplicated).

    Runs in the caller's transaction or its own. A text equal to a chunk of the source's
    document, or to a live synthetic text of the track, counts as a duplicate. If the source is no longer live
    (its document was superseded while a model was writing), nothing is stored.
    """
    out = Added()
    with savepoint(db, "synthetic_add"):
        src = db.conn.execute(
            "SELECT track, document_id, seq, status FROM chunks WHERE id = ?",
            (source_chunk_id,),
        ).fetchone()
        if src is None or src[3] not in _LIVE_STATUSES:
            out.source_gone = True
            return out
        track, doc_id, seq = src[0], src[1], src[2]
        now = time.time()
        for item in items:
            digest = content_hash(item.text)
            if _in_document(db, doc_id, item.text) or _live_hash(db, track, digest):
                out.duplicates += 1
                continue
            cur = db.conn.execute(
                "INSERT INTO chunks (track, document_id, seq, kind, text, n_tokens, split,"
                " status, created_at) VALUES (?, ?, ?, 'text', ?, ?, ?, 'pending', ?)",
                (track, doc_id, seq, item.text, item.n_tokens, SYNTHETIC, now),
            )
            chunk_id = int(cur.lastrowid or 0)
            db.conn.execute(
                "INSERT INTO chunk_lineage (chunk_id, track, source_chunk_id, method, variant,"
                " content_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (chunk_id, track, source_chunk_id, method, item.variant, digest, now),
            )
            out.ids.append(chunk_id)
    return out


def mark_augmented(
    db: sqlite_utils.Database, source_chunk_id: int, method: str, kept: int, note: str = ""
) -> None:
    """Record that ``source_chunk_id`` was augmented with ``method`` (it is not retried)."""
    db.conn.execute(
        "INSERT INTO augmentations (source_chunk_id, method, kept, note, done_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT(source_chunk_id, method) DO UPDATE SET"
        " kept = excluded.kept, note = excluded.note, done_at = excluded.done_at",
        (source_chunk_id, method, kept, note[:500], time.time()),
    )


def for_sources(db: sqlite_utils.Database, source_ids: Iterable[int]) -> list[dict[str, Any]]:
    """Live synthetic chunks of ``source_ids``: ``id``, ``source_chunk_id``, ``n_tokens``,
    ``method``, ``variant``; in the order of ``source_ids``, then by id."""
    ids = list(dict.fromkeys(int(i) for i in source_ids))
    rank = {cid: n for n, cid in enumerate(ids)}
    out: list[dict[str, Any]] = []
    for start in range(0, len(ids), _BATCH):
        part = ids[start : start + _BATCH]
        marks = ",".join("?" * len(part))
        out.extend(
            dict(r)
            for r in db.query(
                "SELECT c.id, l.source_chunk_id, c.n_tokens, l.method, l.variant FROM"
                " chunk_lineage l JOIN chunks c ON c.id = l.chunk_id WHERE c.split = ?"
                f" AND c.status IN (?, ?) AND l.source_chunk_id IN ({marks})",
                [SYNTHETIC, *_LIVE_STATUSES, *part],
            )
        )
    out.sort(key=lambda r: (rank[int(r["source_chunk_id"])], int(r["id"])))
    return out


def ids_and_tokens(db: sqlite_utils.Database, source_ids: Iterable[int]) -> tuple[list[int], int]:
    """What a planner adds for the new chunks ``source_ids``: synthetic ids and their tokens."""
    rows = for_sources(db, source_ids)
    return [int(r["id"]) for r in rows], sum(int(r["n_tokens"]) for r in rows)


def lineage(db: sqlite_utils.Database, chunk_id: int) -> dict[str, Any] | None:
    """Where synthetic chunk ``chunk_id`` came from (None: not a synthetic chunk)."""
    rows = list(db.query("SELECT * FROM chunk_lineage WHERE chunk_id = ?", [chunk_id]))
    return dict(rows[0]) if rows else None


def live_counts(db: sqlite_utils.Database, track: str) -> dict[str, dict[str, int]]:
    """Live synthetic chunks and tokens per method (for ``evergreen status``)."""
    out: dict[str, dict[str, int]] = {}
    for method, n, tokens in db.conn.execute(
        "SELECT l.method, COUNT(*), COALESCE(SUM(c.n_tokens), 0) FROM chunk_lineage l"
        " JOIN chunks c ON c.id = l.chunk_id WHERE l.track = ? AND c.status IN (?, ?)"
        " GROUP BY l.method",
        (track, *_LIVE_STATUSES),
    ):
        out[str(method)] = {"chunks": int(n), "tokens": int(tokens)}
    return out
