"""Feeds the inbox into the pipeline: watchdog events, a stability rule, periodic rescans.

Events only mark a path *pending*. One worker thread owns the DB connection and ingests a
pending file once it is stable: its size and mtime have not changed for ``quiet_period_s``,
or for a second after a close-write event (unless it keeps being closed and written
again; see :mod:`daemon.ingest.stability`). A full rescan at start and every
``rescan_interval_s`` catches files added while the daemon was down and events lost to an
inotify overflow; a rescan that finds a file whose mtime is already older than the quiet
period ingests it at once.

Idle cost: the worker sleeps on a ``threading.Event`` until an event arrives, a pending file
falls due or the next rescan is due (never longer than :data:`MAX_IDLE_WAIT_S`), so an idle
inbox costs a wakeup a minute. With no file pending there is no polling at all.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlite_utils
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.ingest import scan
from daemon.ingest.dirs import ensure_dirs
from daemon.ingest.discover import is_ignored_name
from daemon.ingest.outcome import OnOutcome, Summary
from daemon.ingest.pipeline import Ingester
from daemon.ingest.stability import PendingFiles
from store.db import Database, open_db
from store.errors import store_error

log = logging.getLogger("evergreen.ingest.watcher")

MAX_IDLE_WAIT_S = 60.0  # longest sleep of the worker when nothing is pending
MIN_WAIT_S = 0.05  # shortest sleep while files are pending (no spin on clock jitter)
NO_OBSERVER_RESCAN_S = 10.0  # rescan period when inotify cannot be used
EVENT_COALESCE_S = 0.1  # batch events for this long after a wakeup
ERROR_BACKOFF_S = 1.0  # pause after an unexpected error in the worker loop
STOP_TIMEOUT_S = 30.0

OnChange = Callable[[dict[str, Any]], None]


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: InboxWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        w = self.watcher
        kind = event.event_type
        if event.is_directory:
            if kind == "moved":
                w._renamed(_fs(event.src_path), _fs(event.dest_path), directory=True)
                w._scan_dir_later(_fs(event.dest_path))
            elif kind == "created":
                w._scan_dir_later(_fs(event.src_path))
            elif kind == "deleted":
                w._forget(_fs(event.src_path), directory=True)
            return
        if kind == "moved":
            w._renamed(_fs(event.src_path), _fs(event.dest_path))
            w._touch(_fs(event.dest_path), closed=False)
        elif kind in ("created", "modified"):
            w._touch(_fs(event.src_path), closed=False)
        elif kind == "closed":
            w._touch(_fs(event.src_path), closed=True)
        elif kind == "deleted":
            w._forget(_fs(event.src_path))


def _fs(path: str | bytes) -> str:
    return os.fsdecode(path)


class InboxWatcher:
    """Watches ``cfg.inbox_dir`` and ingests stable files exactly once.

    ``on_change(summary)`` runs on the worker thread after every batch that ingested new or
    revived content or superseded a version (the daemon evaluates its trigger then).
    ``on_outcome(outcome, reason)`` runs once per examined file (see :class:`Ingester`).
    Exceptions from either callback are logged, never propagated.
    """

    def __init__(
        self,
        cfg: Config,
        on_change: OnChange | None = None,
        on_outcome: OnOutcome | None = None,
    ) -> None:
        self.cfg = cfg
        self.inbox = os.path.abspath(cfg.inbox_dir)
        self.on_change = on_change
        self.on_outcome = on_outcome
        self.quiet = cfg.ingest.quiet_period_s
        self.rescan_interval = cfg.ingest.rescan_interval_s
        self._lock = threading.Lock()  # guards the event queues below
        self._pending = PendingFiles(self.quiet)
        self._dirs: set[str] = set()
        self._gone: set[tuple[str, bool]] = set()  # (path, is_directory)
        self._moves: list[tuple[str, str, bool]] = []  # (src, dest, is_directory)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requests: queue.Queue[tuple[threading.Event, dict[str, Any]]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._observer: Any = None
        self._ingester: Ingester | None = None
        self._last_error = ""  # the store problem logged last (logged again once it changes)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the inbox, start watching, then rescan (on the worker thread)."""
        if self._worker is not None:
            return
        ensure_dirs(self.cfg)
        self._stop.clear()
        observer = Observer()
        try:
            observer.schedule(_Handler(self), self.inbox, recursive=True)
            observer.start()
            self._observer = observer
        except OSError as exc:  # e.g. inotify watch limit reached: rescans still work
            log.warning(
                "cannot watch %s (%s); polling every %.0f s", self.inbox, exc, NO_OBSERVER_RESCAN_S
            )
            self._observer = None
            if not self.rescan_interval or self.rescan_interval > NO_OBSERVER_RESCAN_S:
                self.rescan_interval = NO_OBSERVER_RESCAN_S
        self._worker = threading.Thread(target=self._run, name="evergreen-inbox", daemon=True)
        self._worker.start()
        log.info("watching %s (quiet period %.1f s)", self.inbox, self.quiet)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop watching and join both threads; a batch in flight finishes first."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def pending(self) -> int:
        """Files seen but not yet stable."""
        return len(self._pending)

    def rescan(self, timeout: float | None = None) -> dict[str, Any]:
        """Scan the whole inbox now and ingest what is stable; returns the summary.

        While running, the scan is done by the worker thread (the only user of its DB
        connection) and this call waits for it; otherwise it runs here on a short-lived
        connection.
        """
        if self.running:
            done = threading.Event()
            result: dict[str, Any] = {}
            self._requests.put((done, result))
            self._wake.set()
            done.wait(timeout)
            return result
        with open_db(self.cfg.db_path) as db:
            self._ingester = Ingester(self.cfg, db, on_outcome=self.on_outcome)
            try:
                return self._rescan()
            finally:
                self._ingester = None

    # ------------------------------------------------------------------ event side
    def _touch(self, path: str, *, closed: bool) -> None:
        if self._wanted(path) and self._pending.touch(path, closed=closed):
            self._wake.set()

    def _forget(self, path: str, *, directory: bool = False) -> None:
        """A path (or a whole directory) left the inbox: drop it, and mark it gone later."""
        self._pending.drop(path)
        with self._lock:
            self._gone.add((path, directory))
        self._wake.set()

    def _renamed(self, src: str, dest: str, *, directory: bool = False) -> None:
        """Moved inside the inbox: the history follows the file; moved out: it is gone."""
        self._pending.drop(src)
        with self._lock:
            if self._wanted(dest):
                self._moves.append((src, dest, directory))
            else:
                self._gone.add((src, directory))
        self._wake.set()

    def _scan_dir_later(self, path: str) -> None:
        if self._wanted(path):
            with self._lock:
                self._dirs.add(path)
            self._wake.set()

    def _wanted(self, path: str) -> bool:
        rel = os.path.relpath(path, self.inbox)
        if rel.startswith(".."):
            return False
        return not any(part.startswith(".") for part in rel.split(os.sep)) and not (
            is_ignored_name(os.path.basename(path))
        )

    # ------------------------------------------------------------------ worker side
    def _run(self) -> None:
        db = self._open_store()
        if db is None:
            return
        with db:
            self._ingester = Ingester(self.cfg, db, on_outcome=self.on_outcome)
            next_rescan = time.monotonic()  # the startup rescan
            try:
                while not self._stop.is_set():
                    try:
                        next_rescan = self._step(next_rescan)
                        self._last_error = ""
                    except Exception as exc:
                        self._log_error("inbox worker error", exc)
                        self._stop.wait(ERROR_BACKOFF_S)
            finally:
                self._ingester = None
                self._release_waiters()

    def _open_store(self) -> Database | None:
        """The worker's connection; None when stopped before the store could be opened.

        The worker must never die silently: a store it cannot open yet (locked, disk
        full) is retried, and the inbox is only as late as the store is unavailable.
        """
        while True:
            try:
                return open_db(self.cfg.db_path)
            except Exception as exc:
                self._log_error("inbox worker cannot open the store", exc)
                if self._stop.wait(ERROR_BACKOFF_S):
                    self._release_waiters()
                    return None

    def _log_error(self, what: str, exc: Exception) -> None:
        """One line for a store problem the user can fix (disk full, corrupt, locked),
        logged when it starts or changes rather than every retry; a traceback otherwise.
        """
        known = exc if isinstance(exc, EvergreenError) else store_error(exc, self.cfg.db_path)
        if known is None:
            log.exception("%s; retrying in %.0f s", what, ERROR_BACKOFF_S)
        elif str(known) != self._last_error:
            log.error("%s: %s (retrying every %.0f s)", what, known, ERROR_BACKOFF_S)
        self._last_error = "" if known is None else str(known)

    def _release_waiters(self) -> None:
        """Anyone still waiting on rescan() gets an empty answer rather than hanging."""
        while not self._requests.empty():
            self._requests.get_nowait()[0].set()

    def _step(self, next_rescan: float) -> float:
        """One pass of the worker loop; returns when the next periodic rescan is due."""
        dirs = self._apply_renames_and_removals()
        while not self._requests.empty():
            done, result = self._requests.get_nowait()
            try:
                result.update(self._rescan())
            finally:
                done.set()
        if time.monotonic() >= next_rescan:
            self._rescan()
            now = time.monotonic()
            next_rescan = now + self.rescan_interval if self.rescan_interval > 0 else float("inf")
        for d in dirs:
            scan.scan(self._db(), self.cfg.track, d, self._pending)
        next_due = self._ingest_due()
        wait = min(next_due, next_rescan) - time.monotonic()
        wait = min(max(wait, MIN_WAIT_S), MAX_IDLE_WAIT_S)
        if self._requests.empty() and not self._stop.is_set() and self._wake.wait(wait):
            # Woken by an event: let a burst (a bulk copy) accumulate before the next pass,
            # so the loop runs at most ~1/EVENT_COALESCE_S times a second under load.
            self._stop.wait(EVENT_COALESCE_S)
        self._wake.clear()
        return next_rescan

    def _apply_renames_and_removals(self) -> set[str]:
        """Renames and removals first: a rescan must not see a renamed file as new.

        Returns the new directories to scan.
        """
        with self._lock:
            dirs, self._dirs = self._dirs, set()
            gone, self._gone = self._gone, set()
            moves, self._moves = self._moves, []
        if moves:
            scan.apply_moves(self._db(), self.cfg.track, moves)
        if gone:
            scan.mark_gone(self._db(), self.cfg.track, gone)
        return dirs

    def _db(self) -> sqlite_utils.Database:
        """The worker's connection (only the worker, or an inline rescan, uses it)."""
        assert self._ingester is not None
        return self._ingester.db

    def _rescan(self) -> dict[str, Any]:
        """Queue every new or changed file in the inbox, then ingest the stable ones."""
        started = time.monotonic()
        found = scan.scan(self._db(), self.cfg.track, self.inbox, self._pending)
        summary = Summary()
        self._ingest_due(summary)
        data = summary.as_dict()
        data["found"] = found
        data["pending"] = self.pending()
        log.debug("rescan: %d new/changed, %.2f s", found, time.monotonic() - started)
        return data

    def _ingest_due(self, summary: Summary | None = None) -> float:
        """Ingest every stable pending file; returns when the next one may fall due."""
        while True:
            due, next_due = self._pending.collect_due()
            if not due:
                return next_due
            ingester = self._ingester
            assert ingester is not None
            size = self.cfg.ingest.batch_size
            for start in range(0, len(due), size):
                part = due[start : start + size]
                outcomes = ingester.ingest_many([(p, self.inbox) for p, _ in part], size)
                for path, gen in part:
                    self._pending.done(path, gen)
                batch = Summary()
                batch.add(outcomes)
                if summary is not None:
                    summary.add(outcomes)
                if batch.changed:
                    self._changed(batch.as_dict())
                if self._stop.is_set():
                    return float("inf")

    def _changed(self, summary: dict[str, Any]) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(summary)
        except Exception:
            log.exception("on_change callback failed")
