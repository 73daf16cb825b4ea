"""What a file means for the store, decided exactly once.

Two tables make ingestion idempotent. ``files`` remembers every path with the stat it had
when last read, so a rescan skips an unchanged file without opening it. ``documents`` is
unique per (track, content hash), so the same content under two names, or dropped twice,
is stored once. The content hash is SHA-256 of the *normalised* content (what becomes
chunks), so CRLF and LF copies of a text are one document too.

Work is split in two phases so the write lock is held briefly: :meth:`Ingester.prepare`
stats, reads, parses, cleans and chunks without writing; :meth:`Ingester.commit` applies a
batch of prepared files in one ``BEGIN IMMEDIATE`` transaction and re-checks everything
inside it, so a concurrent ``evergreen ingest`` and the daemon cannot both ingest a file.

Outcomes per file: ``ingested`` (new content, or superseded content that came back),
``duplicate`` (content already stored under another path), ``unchanged``,
``quarantined`` (with a reason class) and ``ignored`` (vanished, or a symlink when
``follow_symlinks`` is off). When a path's content changes, the old document is
superseded unless another path still carries it; the summary counts those separately.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat as stat_mod
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.ingest import parsers
from daemon.ingest.chunking import Chunker, load_tokenizer
from daemon.ingest.clean import clean_segments
from daemon.ingest.parsers import Quarantine
from store import documents, events
from store.db import open_db, transaction
from store.documents import ChunkIn

log = logging.getLogger("evergreen.ingest")

INGESTED, DUPLICATE, UNCHANGED, QUARANTINED, IGNORED = (
    "ingested",
    "duplicate",
    "unchanged",
    "quarantined",
    "ignored",
)
SUPERSEDED = "superseded"
OUTCOMES = (INGESTED, DUPLICATE, UNCHANGED, SUPERSEDED, QUARANTINED, IGNORED)

# Editors, downloaders and sync tools write these before the real file appears.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".swp", ".swx", ".crdownload", "~")

TOKENIZER_RECHECK_S = 10.0  # how often a missing tokenizer.json is looked for again

OnOutcome = Callable[[str, str | None], None]


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary files are never ingested (they are not documents yet)."""
    return name.startswith((".", "~$", "#")) or name.lower().endswith(TEMP_SUFFIXES)


@dataclass(frozen=True)
class Outcome:
    """What happened to one file. ``reason`` is the quarantine reason class."""

    path: str
    outcome: str
    reason: str | None = None
    error: str | None = None
    document_id: int | None = None
    superseded_id: int | None = None
    revived: bool = False
    n_chunks: int = 0
    n_tokens: int = 0


@dataclass
class Prepared:
    """A file read and processed, ready to be applied to the store (no DB writes yet)."""

    path: str
    size: int = 0
    mtime: float = 0.0
    fmt: str = ""
    content_hash: str = ""
    chunks: list[ChunkIn] = field(default_factory=list)
    quarantine: Quarantine | None = None
    skip: str | None = None  # unchanged | ignored: nothing to write


class Ingester:
    """Turns files into store rows; one instance per DB connection (and thread).

    ``on_outcome(outcome, reason)`` is called once for every file that was examined
    (stat-unchanged files skipped by the fast path are not reported), after its
    transaction committed; ``reason`` is the quarantine reason class or None. Exceptions
    from the callback are logged and swallowed.
    """

    def __init__(
        self, cfg: Config, db: sqlite_utils.Database, *, on_outcome: OnOutcome | None = None
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.track = cfg.track
        self.on_outcome = on_outcome
        self._chunker_cache: Chunker | None = None
        self._tokenizer_recheck = 0.0

    # ------------------------------------------------------------------ public
    def ingest_file(self, path: str | os.PathLike[str], root: str | None = None) -> Outcome:
        """Ingest one file in its own transaction."""
        return self.ingest_many([(os.fspath(path), root)])[0]

    def ingest_many(
        self, items: Iterable[tuple[str, str | None]], batch_size: int | None = None
    ) -> list[Outcome]:
        """Ingest ``(path, root)`` pairs, ``batch_size`` files per transaction."""
        size = batch_size or self.cfg.ingest.batch_size
        out: list[Outcome] = []
        batch: list[Prepared] = []
        for path, root in items:
            batch.append(self.prepare(path, root))
            if len(batch) >= size:
                out.extend(self.commit(batch))
                batch = []
        if batch:
            out.extend(self.commit(batch))
        return out

    def prepare(self, path: str, root: str | None = None) -> Prepared:
        """Stat, read, parse, clean and chunk one file. Never raises for a bad file.

        ``root`` is the directory a symlink must stay inside: the inbox for the watcher,
        the directory argument for ``evergreen ingest DIR``, None for a file named
        explicitly on the command line.
        """
        path = os.path.abspath(path)
        try:
            prepared = self._prepare(path, root)
        except Quarantine as q:
            prepared = Prepared(path, quarantine=q)
        except Exception as exc:  # a bug must cost one file, not the daemon
            log.exception("unexpected error preparing %s", path)
            prepared = Prepared(path, quarantine=Quarantine(parsers.UNREADABLE, repr(exc)[:300]))
        prepared.path = path_key(path)
        return prepared

    def commit(self, batch: Sequence[Prepared]) -> list[Outcome]:
        """Apply prepared files in one transaction; returns one outcome per file."""
        todo = [p for p in batch if p.skip is None]
        results: dict[int, Outcome] = {}
        if todo:
            with transaction(self.db):
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
        outcomes = [
            results.get(i) or Outcome(p.path, p.skip or UNCHANGED) for i, p in enumerate(batch)
        ]
        for p, o in zip(batch, outcomes, strict=True):
            if o.outcome == QUARANTINED:
                log.warning("quarantined %s: %s", o.path, o.error)
            elif o.superseded_id is not None:
                log.info("new version of %s supersedes document %d", o.path, o.superseded_id)
            if self.on_outcome is not None and p.skip != UNCHANGED:
                self._notify(o)
        return outcomes

    # ------------------------------------------------------------------ prepare
    def _prepare(self, path: str, root: str | None) -> Prepared:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Prepared(path, skip=IGNORED)
        except OSError as exc:
            raise Quarantine(parsers.UNREADABLE, exc.strerror or str(exc)) from None
        if stat_mod.S_ISLNK(st.st_mode):
            if not self.cfg.ingest.follow_symlinks:
                return Prepared(path, skip=IGNORED)
            target = os.path.realpath(path)
            if root is not None and not _inside(target, os.path.realpath(root)):
                return self._quarantined_unread(
                    path, st, parsers.OUTSIDE_INBOX, f"symlink to {target}"
                )
            try:
                st = os.stat(path)
            except OSError:
                return self._quarantined_unread(path, st, parsers.UNREADABLE, "broken symlink")
        if stat_mod.S_ISDIR(st.st_mode):
            return Prepared(path, skip=IGNORED)
        prev = documents.file_row(self.db, path_key(path))
        if _same_stat(prev, st.st_size, st.st_mtime):
            return Prepared(path, size=st.st_size, mtime=st.st_mtime, skip=UNCHANGED)
        if not stat_mod.S_ISREG(st.st_mode):
            return self._quarantined_unread(path, st, parsers.UNREADABLE, "not a regular file")
        suffix = os.path.splitext(path)[1]
        fmt = parsers.format_of(suffix)
        if fmt is None:
            return self._quarantined_unread(
                path, st, parsers.UNSUPPORTED, f"suffix {suffix or '(none)'!r}"
            )
        limit = self.cfg.ingest.max_file_bytes
        if st.st_size > limit:
            return self._quarantined_unread(
                path, st, parsers.TOO_LARGE, f"{st.st_size} bytes > max_file_bytes {limit}"
            )
        try:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
        except OSError as exc:
            return self._quarantined_unread(path, st, parsers.UNREADABLE, exc.strerror or "")
        if len(data) > limit:  # grew after the stat
            return self._quarantined_unread(
                path, st, parsers.TOO_LARGE, f"more than max_file_bytes {limit}"
            )
        base = Prepared(path, size=len(data), mtime=st.st_mtime, fmt=fmt)
        try:
            base.chunks, base.content_hash = self._process(data, suffix)
        except Quarantine as q:
            base.quarantine = q
            base.content_hash = "quarantine:" + hashlib.sha256(data).hexdigest()
        return base

    def _process(self, data: bytes, suffix: str) -> tuple[list[ChunkIn], str]:
        ic = self.cfg.ingest
        parsed = parsers.parse(data, suffix)
        segments = clean_segments(
            parsed.segments,
            min_chars=ic.min_chars,
            max_garbage_ratio=ic.max_garbage_ratio,
            pii_scrub=ic.pii_scrub,
        )
        chunks = self._chunker().chunk(segments)
        if not chunks:
            raise Quarantine(parsers.EMPTY, "no chunks after cleaning")
        if len(segments) == 1 and segments[0].kind == "text":
            digest = hashlib.sha256(segments[0].text.encode("utf-8")).hexdigest()
        else:
            h = hashlib.sha256()
            for c in chunks:
                h.update(c.kind.encode() + b"\x1f" + c.text.encode("utf-8") + b"\x1e")
            digest = "multi:" + h.hexdigest()
        return chunks, digest

    def _chunker(self) -> Chunker:
        """The chunker, re-checking for the model's tokenizer at most every few seconds.

        Before the seed model exists the byte fallback is used; once it appears, new
        documents are chunked with the real tokenizer (no stat per file in between).
        """
        now = time.monotonic()
        if self._chunker_cache is None or (
            self._chunker_cache.tokenizer is None and now >= self._tokenizer_recheck
        ):
            ic = self.cfg.ingest
            tokenizer = load_tokenizer(self.cfg.resolved_base_model())
            self._chunker_cache = Chunker(ic.chunk_tokens, ic.holdout_fraction, tokenizer)
            self._tokenizer_recheck = now + TOKENIZER_RECHECK_S
        return self._chunker_cache

    def _quarantined_unread(
        self, path: str, st: os.stat_result, reason: str, detail: str
    ) -> Prepared:
        """Quarantine without reading: the hash names the path and stat, not the content."""
        key = f"{path}\0{st.st_size}\0{st.st_mtime}".encode("utf-8", "surrogateescape")
        return Prepared(
            path,
            size=st.st_size,
            mtime=st.st_mtime,
            fmt=parsers.format_of(os.path.splitext(path)[1]) or "unknown",
            content_hash=f"quarantine:{reason}:" + hashlib.sha256(key).hexdigest(),
            quarantine=Quarantine(reason, detail),
        )

    # ------------------------------------------------------------------ apply
    def _apply_isolated(self, p: Prepared) -> Outcome:
        """:meth:`_apply` in a savepoint, so one file's bug cannot poison its whole batch.

        SQLite operational errors (locked, disk full) are re-raised: the batch is retried
        later. Anything else quarantines just this file with an ``unreadable`` reason.
        """
        conn = self.db.conn
        conn.execute("SAVEPOINT ingest_file")
        try:
            outcome = self._apply(p)
        except sqlite3.OperationalError:
            raise
        except Exception as exc:
            conn.execute("ROLLBACK TO ingest_file")
            conn.execute("RELEASE ingest_file")
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
        conn.execute("RELEASE ingest_file")
        return outcome

    def _apply(self, p: Prepared) -> Outcome:
        """Decide and write one file inside the caller's transaction."""
        db, path = self.db, p.path
        if p.quarantine is not None and not p.content_hash:  # failed before a stat
            p.content_hash = "quarantine:" + hashlib.sha256(path.encode()).hexdigest()
            p.fmt = p.fmt or "unknown"
        prev = documents.file_row(db, path)
        if _same_stat(prev, p.size, p.mtime):
            assert prev is not None
            return Outcome(path, UNCHANGED, document_id=prev["document_id"])
        prev_doc = prev["document_id"] if prev else None
        doc_id, outcome, error, revived = self._place_content(p, prev_doc)
        if outcome == UNCHANGED and prev is not None and prev["status"] != documents.GONE:
            file_status = prev["status"]
        else:
            file_status = _FILE_STATUS.get(outcome, documents.INGESTED)
        documents.upsert_file(
            db,
            path,
            track=self.track,
            size=p.size,
            mtime=p.mtime,
            content_hash=p.content_hash,
            document_id=doc_id,
            status=file_status,
            error=error if outcome == QUARANTINED else None,
        )
        superseded = None
        if prev_doc is not None and prev_doc != doc_id and self._retire(prev_doc, path):
            superseded = prev_doc
            self._event(
                "ingest.superseded",
                f"document {prev_doc} superseded by a new version of {path}",
                path,
                old=prev_doc,
                new=doc_id,
            )
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
        row = self.db.conn.execute(
            "SELECT id, status, error FROM documents WHERE track = ? AND content_hash = ?",
            (self.track, p.content_hash),
        ).fetchone()
        if row is None:
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
        doc_id, doc_status, error = int(row[0]), row[1], row[2]
        if prev_doc == doc_id:
            return doc_id, UNCHANGED, error, False  # touched or re-created, same content
        if doc_status == documents.QUARANTINED:
            return doc_id, QUARANTINED, error, False
        if doc_status == documents.SUPERSEDED:
            documents.revive_document(self.db, doc_id, p.path)
            return doc_id, INGESTED, None, True
        return doc_id, DUPLICATE, None, False

    def _retire(self, old_doc: int, path: str) -> bool:
        """Supersede the old version of ``path`` unless another path still carries it.

        A quarantined old version (say the file was empty when first seen) has nothing to
        retire. Returns whether it was superseded.
        """
        row = self.db.conn.execute("SELECT status FROM documents WHERE id = ?", (old_doc,))
        status = row.fetchone()
        if status is None or status[0] in (documents.QUARANTINED, documents.SUPERSEDED):
            return False
        if documents.other_files_of(self.db, old_doc, path) > 0:
            return False
        documents.supersede_document(self.db, old_doc)
        return True

    def _event(self, kind: str, message: str, path: str, **data: Any) -> None:
        events.record(self.db, kind, message, subject=path, track=self.track, data=data)

    def _notify(self, o: Outcome) -> None:
        assert self.on_outcome is not None
        try:
            self.on_outcome(o.outcome, o.reason)
        except Exception:
            log.exception("on_outcome callback failed")


_FILE_STATUS = {
    INGESTED: documents.INGESTED,
    DUPLICATE: documents.DUPLICATE,
    QUARANTINED: documents.QUARANTINED,
}


def _same_stat(prev: dict[str, Any] | None, size: int, mtime: float) -> bool:
    """The stat fast path: same size and mtime as when last read (and not marked gone)."""
    return (
        prev is not None
        and prev["size"] == size
        and prev["mtime"] == mtime
        and prev["status"] != documents.GONE
    )


def _inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def path_key(path: str) -> str:
    """Paths are stored as text; undecodable bytes in a name are kept via surrogateescape."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ---------------------------------------------------------------------- walking + summary
def iter_files(root: str) -> Iterator[str]:
    """Every candidate file under ``root`` (sorted, hidden/temp skipped, dir links not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not is_ignored_name(name):
                yield os.path.join(dirpath, name)


def expand(paths: Iterable[Path | str]) -> list[tuple[str, str | None]]:
    """CLI arguments -> ``(file, containment root)``; a directory is its files' root."""
    out: list[tuple[str, str | None]] = []
    for arg in paths:
        p = os.path.abspath(arg)
        if os.path.isdir(p):
            out.extend((f, p) for f in iter_files(p))
        else:
            out.append((p, None))
    return out


class Summary:
    """Accumulates outcomes into the dict ``ingest_paths`` and ``on_change`` report."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.errors: list[dict[str, str]] = []
        self.files = 0
        self.chunks = 0
        self.tokens = 0
        self.started = time.monotonic()

    def add(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            self.files += 1
            self.counts[o.outcome] += 1
            if o.superseded_id is not None:
                self.counts[SUPERSEDED] += 1
            if o.outcome == QUARANTINED:
                self.errors.append({"path": o.path, "error": o.error or ""})
            self.chunks += o.n_chunks
            self.tokens += o.n_tokens

    @property
    def changed(self) -> bool:
        """Something new for training (new or revived content, or a new version)."""
        return self.counts[INGESTED] > 0 or self.counts[SUPERSEDED] > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcomes": dict(self.counts),
            "errors": self.errors,
            "files": self.files,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "seconds": round(time.monotonic() - self.started, 3),
        }


def ingest_paths(
    cfg: Config,
    paths: list[Path],
    progress: bool = False,
    on_outcome: OnOutcome | None = None,
    *,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Ingest files and directories once (``evergreen ingest``); returns a summary dict.

    ``{"outcomes": {"ingested", "duplicate", "unchanged", "superseded", "quarantined",
    "ignored"}, "errors": [{"path", "error"}], "files", "chunks", "tokens", "seconds"}``.
    """
    summary = Summary()
    items = expand(paths)
    db = open_db(cfg.db_path)
    try:
        db.conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: index pages stay hot
        ingester = Ingester(cfg, db, on_outcome=on_outcome)
        size = batch_size or cfg.ingest.batch_size
        if progress:
            _run_with_progress(ingester, items, size, summary)
        else:
            for start in range(0, len(items), size):
                summary.add(ingester.ingest_many(items[start : start + size], size))
    finally:
        db.conn.close()
    return summary.as_dict()


def _run_with_progress(
    ingester: Ingester, items: list[tuple[str, str | None]], size: int, summary: Summary
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("ingesting", total=len(items))
        for start in range(0, len(items), size):
            part = items[start : start + size]
            summary.add(ingester.ingest_many(part, size))
            bar.advance(task, len(part))
