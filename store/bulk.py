"""Bulk loading: many one-chunk documents in a few statements (the caller's transaction).

The ingest path stores a file at a time (:func:`store.documents.insert_document` and
:func:`store.files.upsert_file`: a few statements and some Python per file). Filling a store
with a million synthetic documents that way costs minutes of interpreter time, which is not
what ``benchmarks/scale_sim.py`` measures: it needs the *rows* (the same tables, indexes and
statuses that ingest writes) to time the queries the daemon runs on a big store. This writes
exactly those rows with three ``executemany`` calls per batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlite_utils

from store.documents import INGESTED, PENDING


@dataclass(frozen=True)
class OneChunkDoc:
    """A document of one chunk, with the inbox path that carried it."""

    path: str
    content_hash: str
    text: str
    n_tokens: int
    split: str  # train | holdout


def insert_one_chunk_docs(
    db: sqlite_utils.Database, track: str, docs: Sequence[OneChunkDoc]
) -> list[int]:
    """Insert ``docs`` as ingested documents with one pending chunk and a file row each, as
    ingest would have; returns their document ids. Call inside :func:`store.db.transaction`
    (the ids are allocated from the current maximum)."""
    if not docs:
        return []
    now = time.time()
    first = int(db.conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM documents").fetchone()[0])
    ids = list(range(first, first + len(docs)))
    db.conn.executemany(
        "INSERT INTO documents (id, track, path, content_hash, size, mtime, format, status,"
        " n_chunks, n_tokens, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,1,?,?,?)",
        [_document_row(i, track, d, now) for i, d in zip(ids, docs, strict=True)],
    )
    db.conn.executemany(
        "INSERT INTO chunks (track, document_id, seq, kind, text, n_tokens, split, status,"
        " created_at) VALUES (?,?,0,'text',?,?,?,?,?)",
        [
            (track, i, d.text, d.n_tokens, d.split, PENDING, now)
            for i, d in zip(ids, docs, strict=True)
        ],
    )
    db.conn.executemany(
        "INSERT INTO files (path, track, size, mtime, content_hash, document_id, status,"
        " seen_at) VALUES (?,?,?,?,?,?,?,?)",
        [
            (d.path, track, len(d.text), 0.0, d.content_hash, i, INGESTED, now)
            for i, d in zip(ids, docs, strict=True)
        ],
    )
    return ids


def _document_row(doc_id: int, track: str, d: OneChunkDoc, now: float) -> tuple[object, ...]:
    size = len(d.text.encode("utf-8"))
    return (doc_id, track, d.path, d.content_hash, size, 0.0, "txt", INGESTED, d.n_tokens, now, now)
