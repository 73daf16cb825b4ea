"""Applying prepared files to the store, exactly once.

Two tables make ingestion idempotent. ``files`` remembers every path with the stat it had
when last read, so a rescan skips an unchanged file without opening it. ``documents`` is
unique per (track, content hash), so the same content under two names, or dropped twice,
is stored once.

A batch is applied in one ``BEGIN IMMEDIATE`` transaction that re-checks everything
inside it, so a concurrent ``evergreen ingest`` and the daemon cannot both ingest a file.
Each file gets its own savepoint: a bug while storing one file quarantines that file and
cannot poison the rest of its batch. When a path's content changes, the old document is
superseded unless another path still carries it.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import sqlite_utils

from daemon.ingest import parsers
from daemon.ingest.outcome import DUPLICATE, INGESTED, QUARANTINED, UNCHANGED, Outcome, Prepared
from daemon.ingest.parsers import Quarantine
from daemon.ingest.prepare import same_stat
from store import documents, events, files
from store.db import page_cache_at_most, savepoint, transaction

log = logging.getLogger("evergreen.ingest")

# A batch holding more bytes than this is written with the page cache capped: its dirty
# pages go to the WAL as they come instead of filling the bulk-ingest cache (64 MiB).
BIG_BATCH_BYTES = 8 * 1024 * 1024
BIG_BATCH_CACHE_MIB = 8

_FILE_STATUS = {
    INGESTED: files.INGESTED,
    DUPLICATE: files.DUPLICATE,
    QUARANTINED: files.QUARANTINED,
}


class Committer:
    """Writes prepared files of one track through one connection."""

    def __init__(self, db: sqlite_utils.Database, track: str) -> None:
        self.db = db
        self.track = track

    def commit(self, batch: Sequence[Prepared]) -> dict[int, Outcome]:
        """Apply the files of ``batch`` that need a write, in one transaction.

        Returns outcomes by index into ``batch``; skipped files have none.
        """
        results: dict[int, Outcome] = {}
        if all(p.skip is not None for p in batch):
            return results
        written = sum(p.size for p in batch if p.skip is None)
        big = written > BIG_BATCH_BYTES
        capped = page_cache_at_most(self.db, BIG_BATCH_CACHE_MIB) if big else nullcontext()
        with capped, transaction(self.db):
            for i, p in enumerate(batch):
                if p.skip is None:
                    results[i] = self._apply_isolated(p)
            ingested = [o for o in results.values() if o.outcome == INGESTED]
            if ingested:
                events.record(
                    self.db,
                    "ingest.ingested",
                    f"ingested {len(ingested)} document(s)",
                    track=self.track,
                    data={
                        "documents": len(ingested),
                        "chunks": sum(o.n_chunks for o in ingested),
                        "tokens": sum(o.n_tokens for o in ingested),
                        "first": ingested[0].path,
                    },
                )
        return results

    def _apply_isolated(self, p: Prepared) -> Outcome:
        """:meth:`_apply` in a savepoint, so one file's bug cannot poison its whole batch.

        SQLite operational errors (locked, disk full) are re-raised: the batch is retried
        later. Anything else quarantines just this file with an ``unreadable`` reason.
        """
        try:
            with savepoint(self.db, "ingest_file"):
                return self._apply(p)
        except sqlite3.OperationalError:
            raise
        except Exception as exc:
            log.exception("could not store %s; quarantining it", p.path)
            key = f"{p.path}\0{p.size}\0{p.mtime}".encode("utf-8", "replace")
            failed = Prepared(
                p.path,
                size=p.size,
                mtime=p.mtime,
                fmt=p.fmt or "unknown",
                content_hash="quarantine:error:" + hashlib.sha256(key).hexdigest(),
                quarantine=Quarantine(parsers.UNREADABLE, f"internal error: {exc!r}"[:300]),
            )
            return self._apply(failed)

    def _apply(self, p: Prepared) -> Outcome:
        """Decide and write one file inside the caller's transaction."""
        path = p.path
        if p.quarantine is not None and not p.content_hash:  # failed before a stat
            p.content_hash = "quarantine:" + hashlib.sha256(path.encode()).hexdigest()
            p.fmt = p.fmt or "unknown"
        prev = files.file_row(self.db, path)
        if same_stat(prev, p.size, p.mtime):
            assert prev is not None
            return Outcome(path, UNCHANGED, document_id=prev["document_id"])
        prev_doc = prev["document_id"] if prev else None
        doc_id, outcome, error, revived = self._place_content(p, prev_doc)
        if outcome == UNCHANGED and prev is not None and prev["status"] != files.GONE:
            file_status = prev["status"]
        else:
            file_status = _FILE_STATUS.get(outcome, files.INGESTED)
        files.upsert_file(
            self.db,
            path,
            track=self.track,
            size=p.size,
            mtime=p.mtime,
            content_hash=p.content_hash,
            document_id=doc_id,
            status=file_status,
            error=error if outcome == QUARANTINED else None,
        )
        superseded = self._supersede_previous(prev_doc, doc_id, path)
        return self._report(p, doc_id, outcome, error=error, revived=revived, superseded=superseded)

    def _report(
        self,
        p: Prepared,
        doc_id: int,
        outcome: str,
        *,
        error: str | None,
        revived: bool,
        superseded: int | None,
    ) -> Outcome:
        """Record the file's events and build its outcome."""
        path = p.path
        if outcome == QUARANTINED:
            reason = (error or "unknown").split(":")[0]
            self._event(
                "ingest.quarantined",
                f"quarantined {path}: {error}",
                path,
                reason=reason,
                document_id=doc_id,
            )
            return Outcome(path, QUARANTINED, reason, error, doc_id, superseded)
        if revived:
            self._event(
                "ingest.revived",
                f"content of {path} came back; document {doc_id} is pending again",
                path,
                document_id=doc_id,
            )
        new = outcome == INGESTED and not revived
        return Outcome(
            path,
            outcome,
            document_id=doc_id,
            superseded_id=superseded,
            revived=revived,
            n_chunks=len(p.chunks) if new else 0,
            n_tokens=sum(c.n_tokens for c in p.chunks) if new else 0,
        )

    def _place_content(
        self, p: Prepared, prev_doc: int | None
    ) -> tuple[int, str, str | None, bool]:
        """Find or store the content: (document id, outcome, error, revived)."""
        doc = documents.document_by_hash(self.db, self.track, p.content_hash)
        if doc is None:
            q = p.quarantine
            doc_id = documents.insert_document(
                self.db,
                track=self.track,
                path=p.path,
                content_hash=p.content_hash,
                size=p.size,
                mtime=p.mtime,
                fmt=p.fmt,
                status=documents.QUARANTINED if q else documents.INGESTED,
                error=str(q) if q else None,
                chunks=p.chunks,
            )
            return doc_id, (QUARANTINED if q else INGESTED), (str(q) if q else None), False
        doc_id, error = doc["id"], doc["error"]
        if prev_doc == doc_id:
            return doc_id, UNCHANGED, error, False  # touched or re-created, same content
        if doc["status"] == documents.QUARANTINED:
            return doc_id, QUARANTINED, error, False
        if doc["status"] == documents.SUPERSEDED:
            documents.revive_document(self.db, doc_id, p.path)
            return doc_id, INGESTED, None, True
        return doc_id, DUPLICATE, None, False

    def _supersede_previous(self, prev_doc: int | None, doc_id: int, path: str) -> int | None:
        """Retire the content ``path`` carried before, if it changed; returns its id."""
        if prev_doc is None or prev_doc == doc_id or not self._retire(prev_doc, path):
            return None
        self._event(
            "ingest.superseded",
            f"document {prev_doc} superseded by a new version of {path}",
            path,
            old=prev_doc,
            new=doc_id,
        )
        return prev_doc

    def _retire(self, old_doc: int, path: str) -> bool:
        """Supersede the old version of ``path`` unless another path still carries it.

        A quarantined old version (say the file was empty when first seen) has nothing to
        retire. Returns whether it was superseded.
        """
        status = documents.document_status(self.db, old_doc)
        if status is None or status in (documents.QUARANTINED, documents.SUPERSEDED):
            return False
        if files.other_files_of(self.db, old_doc, path) > 0:
            return False
        documents.supersede_document(self.db, old_doc)
        return True

    def _event(self, kind: str, message: str, path: str, **data: Any) -> None:
        events.record(self.db, kind, message, subject=path, track=self.track, data=data)
