"""Which inbox files are still being written, and which are stable enough to ingest.

A file is *pending* from its first event (or from a rescan that found it new or changed)
until it is ingested. It becomes *due* once its size and mtime have not changed for the
quiet period, or, after a close-write event (the writer says it is done), once it has not
changed for :data:`CLOSE_SETTLE_S` (or the quiet period, if that is shorter). A close-write
does not end the wait of a file that keeps changing: a path that was closed after writing
more than once within the quiet period (an appender that opens, writes and closes every
few hundred milliseconds, a sync tool writing in rounds) waits the whole quiet period
from its last change, so it is read once, complete, rather than once per close. Only
files due by their event times are stat'ed, so a burst of writes costs no stat per event;
a size or mtime that changed without an event (lost events, polling mode) restarts the
wait.

Thread-safe: the watchdog observer thread marks files, the inbox worker collects them.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

# How long a closed file must stay unchanged: long enough that a writer which closes and
# reopens at once (an appender, a save in several steps) is seen writing again first.
CLOSE_SETTLE_S = 1.0


@dataclass
class _Pending:
    changed_at: float  # monotonic time of the last known change
    closed: bool = False  # a close-write event came after the last change
    repeated: bool = False  # closed more than once within the quiet period: no shortcut
    sig: tuple[int, int] | None = None  # (size, mtime_ns) at the last look
    gen: int = 0  # bumped by every event, so a file changed mid-ingest stays pending


class PendingFiles:
    """The pending set, keyed by path, with the stability rule of the module docstring."""

    def __init__(self, quiet_s: float, close_settle_s: float = CLOSE_SETTLE_S) -> None:
        self.quiet = quiet_s
        self.close_settle = min(close_settle_s, quiet_s)
        self._lock = threading.Lock()
        self._items: dict[str, _Pending] = {}
        # path -> monotonic time of its last close-write; kept after the file is ingested
        # (a writer that closes again soon is still writing), forgotten after the quiet
        # period. Pruned at most once per quiet period, so it costs no scan per event.
        self._closed_at: dict[str, float] = {}
        self._prune_at = 0.0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def touch(self, path: str, *, closed: bool) -> bool:
        """An event for ``path``. Returns whether the worker should wake up for it.

        A further write to a pending file only postpones it, so only a new file or a
        close-write needs the worker.
        """
        now = time.monotonic()
        with self._lock:
            item = self._items.get(path)
            new = item is None
            if item is None:
                item = self._items[path] = _Pending(changed_at=now)
            if closed:
                item.closed = True
                item.repeated |= self._closed_recently(path, now)
            else:
                item.changed_at, item.closed = now, False
            # Events are newer news than the last stat: re-baseline, so a size change the
            # event already explains is not taken for an event-less change later.
            item.sig = None
            item.gen += 1
        return new or closed

    def _closed_recently(self, path: str, now: float) -> bool:
        """Record a close-write of ``path``; whether it had one within the quiet period.

        Caller holds the lock.
        """
        last = self._closed_at.get(path)
        self._closed_at[path] = now
        if now >= self._prune_at:
            cutoff = now - self.quiet
            self._closed_at = {p: t for p, t in self._closed_at.items() if t >= cutoff}
            self._prune_at = now + max(self.quiet, 1.0)
        return last is not None and now - last < self.quiet

    def _wait(self, item: _Pending) -> float:
        """How long ``item`` must stay unchanged before it is due."""
        return self.close_settle if item.closed and not item.repeated else self.quiet

    def drop(self, path: str) -> None:
        """``path`` left the inbox: nothing to ingest there any more."""
        with self._lock:
            self._items.pop(path, None)

    def add_found(self, path: str, st: os.stat_result, age_s: float) -> bool:
        """A rescan found ``path`` new or changed, its mtime ``age_s`` old.

        A file whose mtime is older than the quiet period counts as settled already.
        Returns whether it was not pending before.
        """
        with self._lock:
            if path in self._items:
                return False
            changed_at = time.monotonic() - age_s
            self._items[path] = _Pending(changed_at=changed_at, sig=(st.st_size, st.st_mtime_ns))
            return True

    def add_unreadable(self, path: str) -> bool:
        """A rescan found ``path`` but cannot stat it: due at once (it is quarantined).

        Returns whether it was not pending before.
        """
        with self._lock:
            if path in self._items:
                return False
            self._items[path] = _Pending(changed_at=time.monotonic() - self.quiet)
            return True

    def done(self, path: str, gen: int) -> None:
        """``path`` was ingested as of event generation ``gen``; newer events keep it."""
        with self._lock:
            item = self._items.get(path)
            if item is not None and item.gen == gen:
                del self._items[path]

    def collect_due(self) -> tuple[list[tuple[str, int]], float]:
        """``(path, gen)`` of files stable now (sorted), and when another one could be."""
        with self._lock:
            items = list(self._items.items())
        now = time.monotonic()
        due: list[tuple[str, int]] = []
        next_due = float("inf")
        for path, item in items:
            wait = self._wait(item)
            if now - item.changed_at < wait:
                next_due = min(next_due, item.changed_at + wait)
                continue  # not due by its events yet: no stat needed
            try:
                st = os.stat(path)
                sig: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                with self._lock:
                    if self._items.get(path) is item:
                        del self._items[path]
                continue
            except OSError:
                sig = None  # unreadable: due, the pipeline quarantines it
            if self._settled(item, sig, now):
                due.append((path, item.gen))
            else:
                next_due = min(next_due, item.changed_at + self._wait(item))
        due.sort()
        return due, next_due

    def _settled(self, item: _Pending, sig: tuple[int, int] | None, now: float) -> bool:
        """Record the stat just taken; whether the file is stable by it."""
        with self._lock:
            if item.sig is not None and sig is not None and item.sig != sig:
                item.changed_at, item.closed = now, False  # changed without an event
            item.sig = sig
            return sig is None or now - item.changed_at >= self._wait(item)
