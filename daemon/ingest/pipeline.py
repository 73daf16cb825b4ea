"""What a file means for the store, decided exactly once.

Work is split in two phases so the write lock is held briefly: :meth:`Ingester.prepare`
stats, reads, parses, cleans and chunks without writing (:mod:`daemon.ingest.prepare`);
:meth:`Ingester.commit` applies a batch of prepared files in one transaction and
re-checks everything inside it (:mod:`daemon.ingest.commit`).

Outcomes per file: ``ingested`` (new content, or superseded content that came back),
``duplicate`` (content already stored under another path), ``unchanged``,
``quarantined`` (with a reason class) and ``ignored`` (vanished, or a symlink when
``follow_symlinks`` is off). When a path's content changes, the old document is
superseded unless another path still carries it; the summary counts those separately.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.ingest.commit import Committer
from daemon.ingest.dirs import ensure_dir
from daemon.ingest.discover import expand
from daemon.ingest.outcome import QUARANTINED, UNCHANGED, OnOutcome, Outcome, Prepared, Summary
from daemon.ingest.prepare import Preparer
from store.db import open_db

log = logging.getLogger("evergreen.ingest")

INGEST_CACHE_MIB = 64  # SQLite page cache of a bulk ingest: index pages stay hot

# A batch is committed once it holds this many bytes of files, whatever ``batch_size``
# says: prepared files stay in memory until their commit, so 256 large files would
# otherwise be held at once, and a huge file is committed on its own rather than making
# the small files prepared before it wait (a config key would belong in daemon.config).


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
        self._preparer = Preparer(cfg, db)
        self._committer = Committer(db, cfg.track)

    def ingest_file(self, path: str | os.PathLike[str], root: str | None = None) -> Outcome:
        """Ingest one file in its own transaction."""
        return self.ingest_many([(os.fspath(path), root)])[0]

    def ingest_many(
        self, items: Iterable[tuple[str, str | None]], batch_size: int | None = None
    ) -> list[Outcome]:
        """Ingest ``(path, root)`` pairs in order, one transaction per batch.

        A batch ends at ``batch_size`` files or ``ingest.batch_max_bytes`` bytes of files,
        whichever comes first; a file larger than the byte bound is a batch of its own.
        """
        size = batch_size or self.cfg.ingest.batch_size
        max_bytes = self.cfg.ingest.batch_max_bytes
        out: list[Outcome] = []
        batch: list[Prepared] = []
        held = 0
        for path, root in items:
            if batch and held + _size_on_disk(path) > max_bytes:
                out.extend(self.commit(batch))  # before the big file is even read
                batch, held = [], 0
            prepared = self.prepare(path, root)
            if batch and held + prepared.size > max_bytes:  # it grew meanwhile
                out.extend(self.commit(batch))
                batch, held = [], 0
            batch.append(prepared)
            held += prepared.size
            if len(batch) >= size or held >= max_bytes:
                out.extend(self.commit(batch))
                batch, held = [], 0
        if batch:
            out.extend(self.commit(batch))
        return out

    def prepare(self, path: str, root: str | None = None) -> Prepared:
        """Stat, read, parse, clean and chunk one file (see :class:`Preparer`)."""
        return self._preparer.prepare(path, root)

    def commit(self, batch: Sequence[Prepared]) -> list[Outcome]:
        """Apply prepared files in one transaction; returns one outcome per file."""
        results = self._committer.commit(batch)
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

    def _notify(self, o: Outcome) -> None:
        assert self.on_outcome is not None
        try:
            self.on_outcome(o.outcome, o.reason)
        except Exception:
            log.exception("on_outcome callback failed")


def _size_on_disk(path: str) -> int:
    """A file's size now (0 when it cannot be stat'ed: prepare will say why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


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
    ensure_dir("state_dir", cfg.state_path, writable=True)
    summary = Summary()
    items = expand(paths)
    with open_db(cfg.db_path, cache_mib=INGEST_CACHE_MIB) as db:
        ingester = Ingester(cfg, db, on_outcome=on_outcome)
        size = batch_size or cfg.ingest.batch_size
        if progress:
            _run_with_progress(ingester, items, size, summary)
        else:
            for start in range(0, len(items), size):
                summary.add(ingester.ingest_many(items[start : start + size], size))
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
