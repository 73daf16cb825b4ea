"""Preparing one file for the store: stat, read, parse, clean, chunk, hash. No writes.

This runs outside the write transaction, so the store's write lock is held only while a
batch is committed (:mod:`daemon.ingest.commit`). It never raises for a bad file: every
failure becomes a :class:`Prepared` carrying a quarantine reason.

The content hash is SHA-256 of the *normalised* content (what becomes chunks), so CRLF
and LF copies of a text are one document. A file quarantined before it was read (too
large, unsupported, outside the inbox) is hashed by its path and stat instead, so it is
never read just to be refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as stat_mod
import time
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.ingest import parsers, reading
from daemon.ingest.chunking import Chunker, load_tokenizer
from daemon.ingest.clean import clean_segments
from daemon.ingest.discover import inside, path_key
from daemon.ingest.outcome import IGNORED, UNCHANGED, Prepared
from daemon.ingest.parsers import Quarantine, Segment
from store import files
from store.documents import ChunkIn

log = logging.getLogger("evergreen.ingest")

TOKENIZER_RECHECK_S = 10.0  # how often a missing tokenizer.json is looked for again
HASH_SLICE_CHARS = 1 << 20  # a long text is hashed a slice at a time


def _text_digest(text: str) -> str:
    """SHA-256 of ``text`` as UTF-8, encoded a slice at a time (no whole-text copy)."""
    h = hashlib.sha256()
    for i in range(0, len(text), HASH_SLICE_CHARS):
        h.update(text[i : i + HASH_SLICE_CHARS].encode("utf-8"))
    return h.hexdigest()


class _Done(Exception):
    """Preparation ended early with this result (skipped, or quarantined unread)."""

    def __init__(self, prepared: Prepared) -> None:
        super().__init__(prepared.path)
        self.prepared = prepared


def same_stat(prev: dict[str, Any] | None, size: int, mtime: float) -> bool:
    """The stat fast path: same size and mtime as when last read (and not marked gone)."""
    return (
        prev is not None
        and prev["size"] == size
        and prev["mtime"] == mtime
        and prev["status"] != files.GONE
    )


def quarantined_unread(path: str, st: os.stat_result, reason: str, detail: str) -> Prepared:
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


class Preparer:
    """Reads files for one connection; reads the store only for the stat fast path."""

    def __init__(self, cfg: Config, db: sqlite_utils.Database) -> None:
        self.cfg = cfg
        self.db = db
        self._chunker_cache: Chunker | None = None
        self._tokenizer_recheck = 0.0

    def prepare(self, path: str, root: str | None = None) -> Prepared:
        """Stat, read, parse, clean and chunk one file. Never raises for a bad file.

        ``root`` is the directory a symlink must stay inside: the inbox for the watcher,
        the directory argument for ``evergreen ingest DIR``, None for a file named
        explicitly on the command line.
        """
        path = os.path.abspath(path)
        try:
            prepared = self._prepare(path, root)
        except _Done as done:
            prepared = done.prepared
        except Quarantine as q:
            prepared = Prepared(path, quarantine=q)
        except Exception as exc:  # a bug must cost one file, not the daemon
            log.exception("unexpected error preparing %s", path)
            prepared = Prepared(path, quarantine=Quarantine(parsers.UNREADABLE, repr(exc)[:300]))
        prepared.path = path_key(path)
        return prepared

    def _prepare(self, path: str, root: str | None) -> Prepared:
        st, is_link = self._stat(path, root)
        prev = files.file_row(self.db, path_key(path))
        if same_stat(prev, st.st_size, st.st_mtime):
            return Prepared(path, size=st.st_size, mtime=st.st_mtime, skip=UNCHANGED)
        fmt, suffix = self._check(path, st)
        data, st = self._read(path, root, st, is_link=is_link)
        prepared = Prepared(path, size=len(data), mtime=st.st_mtime, fmt=fmt)
        # A quarantine names the raw bytes; hashed now so the bytes can go after parsing.
        raw_hash = "quarantine:" + hashlib.sha256(data).hexdigest()
        try:
            segments = parsers.parse(data, suffix).segments
            del data  # a big file is not held three times (bytes, parsed, cleaned)
            prepared.chunks, prepared.content_hash = self._process(segments)
        except Quarantine as q:
            prepared.quarantine = q
            prepared.content_hash = raw_hash
        return prepared

    def _stat(self, path: str, root: str | None) -> tuple[os.stat_result, bool]:
        """``(stat, is_link)`` of what ``path`` names, after the symlink rules.

        A link whose target is outside ``root`` is refused here already, unread; the file
        actually opened is checked again by :func:`reading.open_checked`.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise _Done(Prepared(path, skip=IGNORED)) from None
        except OSError as exc:
            raise Quarantine(parsers.UNREADABLE, exc.strerror or str(exc)) from None
        is_link = stat_mod.S_ISLNK(st.st_mode)
        if is_link:
            if not self.cfg.ingest.follow_symlinks:
                raise _Done(Prepared(path, skip=IGNORED))
            target = os.path.realpath(path)
            if root is not None and not inside(target, os.path.realpath(root)):
                detail = f"symlink to {target}"
                raise _Done(quarantined_unread(path, st, parsers.OUTSIDE_INBOX, detail))
            try:
                st = os.stat(path)
            except OSError:
                raise _Done(
                    quarantined_unread(path, st, parsers.UNREADABLE, "broken symlink")
                ) from None
        if stat_mod.S_ISDIR(st.st_mode):
            raise _Done(Prepared(path, skip=IGNORED))
        return st, is_link

    def _check(self, path: str, st: os.stat_result) -> tuple[str, str]:
        """``(format, suffix)`` of a file worth reading; ends early with its quarantine."""
        if not stat_mod.S_ISREG(st.st_mode):
            raise _Done(quarantined_unread(path, st, parsers.UNREADABLE, "not a regular file"))
        suffix = os.path.splitext(path)[1]
        fmt = parsers.format_of(suffix)
        if fmt is None:
            detail = f"suffix {suffix or '(none)'!r}"
            raise _Done(quarantined_unread(path, st, parsers.UNSUPPORTED, detail))
        limit = self.cfg.ingest.max_file_bytes
        if st.st_size > limit:
            detail = f"{st.st_size} bytes > max_file_bytes {limit}"
            raise _Done(quarantined_unread(path, st, parsers.TOO_LARGE, detail))
        return fmt, suffix

    def _read(
        self, path: str, root: str | None, st: os.stat_result, *, is_link: bool
    ) -> tuple[bytes, os.stat_result]:
        """The bytes of the file opened once, and that descriptor's stat.

        At most ``max_file_bytes`` are read (a file that grew since the stat is refused).
        A refusal names the stat taken before the open, so the next change of the name
        is read again.
        """
        limit = self.cfg.ingest.max_file_bytes
        try:
            fd, st_fd = reading.open_checked(
                path, root, is_link=is_link, hardlinks=self.cfg.ingest.follow_hardlinks
            )
        except Quarantine as q:
            raise _Done(quarantined_unread(path, st, q.reason, q.detail)) from None
        try:
            data = reading.read_fd(fd, limit)
        except OSError as exc:
            detail = exc.strerror or ""
            raise _Done(quarantined_unread(path, st, parsers.UNREADABLE, detail)) from None
        finally:
            os.close(fd)
        if len(data) > limit:  # grew after the stat
            detail = f"more than max_file_bytes {limit}"
            raise _Done(quarantined_unread(path, st, parsers.TOO_LARGE, detail))
        return data, st_fd

    def _process(self, parsed: list[Segment]) -> tuple[list[ChunkIn], str]:
        """Clean and chunk; the content hash of what the chunks say.

        ``parsed`` is emptied once cleaned, so the parsed text is freed before chunking.
        """
        ic = self.cfg.ingest
        segments = clean_segments(
            parsed,
            min_chars=ic.min_chars,
            max_garbage_ratio=ic.max_garbage_ratio,
            pii_scrub=ic.pii_scrub,
        )
        parsed.clear()
        single = len(segments) == 1 and segments[0].kind == "text"
        digest = _text_digest(segments[0].text) if single else ""
        chunks = self.chunker().chunk(segments)
        if not chunks:
            raise Quarantine(parsers.EMPTY, "no chunks after cleaning")
        if not single:
            h = hashlib.sha256()
            for c in chunks:
                h.update(c.kind.encode() + b"\x1f" + c.text.encode("utf-8") + b"\x1e")
            digest = "multi:" + h.hexdigest()
        return chunks, digest

    def chunker(self) -> Chunker:
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
