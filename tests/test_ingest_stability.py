"""PendingFiles: when a close-write ends the wait, and when it does not.

Real files and the real clock; the quiet period is a minute, so "not due yet" cannot be
an accident of a slow machine, and "due" is waited for with a bound.
"""

from __future__ import annotations

import time
from pathlib import Path

from daemon.ingest.stability import PendingFiles

QUIET_S = 60.0
SETTLE_S = 0.2
WAIT_S = 30.0


def _due_within(pending: PendingFiles, path: str, timeout: float = WAIT_S) -> int | None:
    """The generation of ``path`` once it is due (None if it never was within ``timeout``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        due, _ = pending.collect_due()
        for p, gen in due:
            if p == path:
                return gen
        time.sleep(0.05)
    return None


def _write_and_close(pending: PendingFiles, path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
    pending.touch(str(path), closed=False)
    pending.touch(str(path), closed=True)


def test_a_single_close_write_shortens_the_wait(tmp_path: Path) -> None:
    pending = PendingFiles(QUIET_S, close_settle_s=SETTLE_S)
    path = tmp_path / "once.txt"
    _write_and_close(pending, path, "written in one go\n")
    assert _due_within(pending, str(path)) is not None


def test_a_file_closed_again_within_the_quiet_period_waits_all_of_it(tmp_path: Path) -> None:
    pending = PendingFiles(QUIET_S, close_settle_s=SETTLE_S)
    path = tmp_path / "appender.txt"
    _write_and_close(pending, path, "first round\n")
    gen = _due_within(pending, str(path))
    assert gen is not None
    pending.done(str(path), gen)  # ingested; the writer comes back for a second round
    _write_and_close(pending, path, "second round\n")
    time.sleep(SETTLE_S * 3)
    due, next_due = pending.collect_due()
    assert due == []
    assert next_due - time.monotonic() > QUIET_S / 2  # the whole quiet period, not the settle
    # Another file closed once meanwhile is not held back by the appender.
    other = tmp_path / "other.txt"
    _write_and_close(pending, other, "unrelated\n")
    assert _due_within(pending, str(other)) is not None


def test_no_close_write_means_the_quiet_period(tmp_path: Path) -> None:
    pending = PendingFiles(QUIET_S, close_settle_s=SETTLE_S)
    path = tmp_path / "open.txt"
    path.write_text("still being written")
    pending.touch(str(path), closed=False)
    time.sleep(SETTLE_S * 3)
    due, next_due = pending.collect_due()
    assert due == [] and next_due - time.monotonic() > QUIET_S / 2
