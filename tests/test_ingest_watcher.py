"""InboxWatcher: real watchdog observer, real files, real store; waits poll the store."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.ingest.watcher import InboxWatcher
from tests.ingest_helpers import LOREM, docs, make_cfg, rows, text_of

WAIT_S = 60.0  # generous upper bound for a loaded CI machine; not a speed assertion


def wait_for(cond: Callable[[], bool], timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def watcher_factory() -> Iterator[Callable[..., InboxWatcher]]:
    made: list[InboxWatcher] = []

    def make(cfg: Config, **kw: Any) -> InboxWatcher:
        w = InboxWatcher(cfg, **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def test_file_written_slowly_is_ingested_once_and_complete(
    state_dir: Path, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    # Quiet period longer than the pause between writes: the file never looks stable
    # until the writer closes it.
    cfg = make_cfg(state_dir, quiet_period_s=5.0)
    changes: list[dict[str, Any]] = []
    watcher = watcher_factory(cfg, on_change=changes.append)
    watcher.start()
    path = Path(cfg.inbox_dir) / "slow.txt"
    lines = [f"line {i}: {LOREM}" for i in range(12)]

    def writer() -> None:
        with path.open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line + "\n")
                fh.flush()
                time.sleep(0.3)

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    wait_for(lambda: len(docs(cfg)) >= 1)
    watcher.rescan()  # anything still pending is settled by now
    all_docs = docs(cfg)
    assert len(all_docs) == 1, all_docs
    assert all_docs[0]["status"] == "ingested"
    text = text_of(cfg, all_docs[0]["id"])
    assert "line 0:" in text and "line 11:" in text
    assert text.count("line ") == 12
    assert rows(cfg, "SELECT * FROM documents WHERE status = 'superseded'") == []
    assert sum(c["outcomes"]["ingested"] for c in changes) == 1


def test_files_added_while_stopped_are_picked_up_at_start(
    cfg: Config, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    first = watcher_factory(cfg)
    first.start()
    inbox = Path(cfg.inbox_dir)
    (inbox / "early.txt").write_text(LOREM + " early")
    wait_for(lambda: len(docs(cfg)) == 1)
    first.stop()
    assert not first.running

    for i in range(5):
        (inbox / "sub").mkdir(exist_ok=True)
        (inbox / "sub" / f"late{i}.md").write_text(f"{LOREM} late {i}")
    (inbox / "early.txt").write_text(LOREM + " early, edited while the daemon was down")

    second = watcher_factory(cfg)
    second.start()
    wait_for(lambda: len(docs(cfg)) == 7)
    statuses = sorted(d["status"] for d in docs(cfg))
    assert statuses == ["ingested"] * 6 + ["superseded"]
    second.stop()


def test_rescan_reports_and_is_idempotent(
    cfg: Config, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True)
    old = time.time() - 60  # mtime older than the quiet period: settled already
    for i in range(3):
        p = inbox / f"d{i}.txt"
        p.write_text(f"{LOREM} {i}")
        os.utime(p, (old, old))
    (inbox / "bad.txt").write_bytes(b"\xff" * 100)
    os.utime(inbox / "bad.txt", (old, old))

    outcomes: list[tuple[str, str | None]] = []
    watcher = watcher_factory(cfg, on_outcome=lambda o, r: outcomes.append((o, r)))
    summary = watcher.rescan()  # not started: runs inline
    assert summary["outcomes"]["ingested"] == 3
    assert summary["outcomes"]["quarantined"] == 1
    assert ("quarantined", "undecodable") in outcomes

    watcher.start()
    again = watcher.rescan(timeout=WAIT_S)  # running: done by the worker thread
    assert again["found"] == 0 and again["files"] == 0
    assert len(rows(cfg, "SELECT * FROM events WHERE kind = 'ingest.quarantined'")) == 1


def test_new_file_and_moved_in_directory_are_ingested(
    cfg: Config, watcher_factory: Callable[..., InboxWatcher], tmp_path: Path
) -> None:
    changes: list[dict[str, Any]] = []
    watcher = watcher_factory(cfg, on_change=changes.append)
    watcher.start()
    inbox = Path(cfg.inbox_dir)
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(3):
        (staging / f"m{i}.txt").write_text(f"{LOREM} moved {i}")
    staging.rename(inbox / "batch")
    (inbox / "direct.txt").write_text(LOREM + " direct")
    (inbox / ".hidden.txt").write_text(LOREM + " hidden")
    (inbox / "partial.txt.part").write_text(LOREM + " partial")
    wait_for(lambda: len(docs(cfg)) == 4)
    watcher.stop()
    names = sorted(Path(d["path"]).name for d in docs(cfg))
    assert names == ["direct.txt", "m0.txt", "m1.txt", "m2.txt"]
    assert sum(c["outcomes"]["ingested"] for c in changes) == 4


def test_stop_joins_threads_and_is_repeatable(
    cfg: Config, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    watcher = watcher_factory(cfg)
    watcher.start()
    assert watcher.running and Path(cfg.inbox_dir).is_dir()
    watcher.stop()
    watcher.stop()
    assert not watcher.running
    names = {t.name for t in threading.enumerate()}
    assert "evergreen-inbox" not in names


def test_close_write_makes_a_file_due_without_waiting_the_quiet_period(
    state_dir: Path, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    cfg = make_cfg(state_dir, quiet_period_s=600.0, rescan_interval_s=0.0)
    watcher = watcher_factory(cfg)
    watcher.start()
    (Path(cfg.inbox_dir) / "closed.txt").write_text(LOREM + " closed")
    wait_for(lambda: len(docs(cfg)) == 1)  # only a close-write event can make it due now
    wait_for(lambda: watcher.pending() == 0)  # dropped from pending right after the commit


def test_renamed_then_edited_file_supersedes_its_old_content(
    cfg: Config, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    watcher = watcher_factory(cfg)
    watcher.start()
    inbox = Path(cfg.inbox_dir)
    # Written in the instant the worker opens the store (this once raced the WAL switch).
    (inbox / "draft.txt").write_text(LOREM + " first draft")
    wait_for(lambda: len(docs(cfg)) == 1)
    (inbox / "draft.txt").rename(inbox / "final.txt")
    # The rename carries the file's history: the store now knows it as final.txt.
    wait_for(
        lambda: [Path(r["path"]).name for r in rows(cfg, "SELECT path FROM files")] == ["final.txt"]
    )
    (inbox / "final.txt").write_text(LOREM + " final version, edited after the rename")
    wait_for(lambda: len(docs(cfg)) == 2)
    wait_for(lambda: [d["status"] for d in docs(cfg)] == ["superseded", "ingested"])


def test_files_deleted_while_stopped_are_marked_gone_and_content_is_kept(
    cfg: Config, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True)
    (inbox / "keep.txt").write_text(LOREM + " keep")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "drop.txt").write_text(LOREM + " drop")
    old = time.time() - 60
    for p in (inbox / "keep.txt", inbox / "sub" / "drop.txt"):
        os.utime(p, (old, old))
    watcher = watcher_factory(cfg)
    assert watcher.rescan()["outcomes"]["ingested"] == 2
    (inbox / "sub" / "drop.txt").unlink()
    watcher.rescan()
    files = {Path(r["path"]).name: r["status"] for r in rows(cfg, "SELECT * FROM files")}
    assert files == {"keep.txt": "ingested", "drop.txt": "gone"}
    assert [d["status"] for d in docs(cfg)] == ["ingested", "ingested"]
    # It comes back unchanged: a live carrier again, still one document.
    (inbox / "sub" / "drop.txt").write_text(LOREM + " drop")
    os.utime(inbox / "sub" / "drop.txt", (old, old))
    watcher.rescan()
    files = {Path(r["path"]).name: r["status"] for r in rows(cfg, "SELECT * FROM files")}
    assert files == {"keep.txt": "ingested", "drop.txt": "ingested"}
    assert len(docs(cfg)) == 2


def test_file_moved_out_of_the_inbox_is_gone(
    cfg: Config, watcher_factory: Callable[..., InboxWatcher], tmp_path: Path
) -> None:
    watcher = watcher_factory(cfg)
    watcher.start()
    inbox = Path(cfg.inbox_dir)
    (inbox / "a.txt").write_text(LOREM + " a")
    (inbox / "b.txt").write_text(LOREM + " b")
    wait_for(lambda: len(docs(cfg)) == 2)
    (inbox / "a.txt").rename(tmp_path / "a.txt")
    (inbox / "b.txt").rename(inbox / ".b.txt.bak")  # to an ignored name: out of sight too
    wait_for(
        lambda: (
            sorted(r["status"] for r in rows(cfg, "SELECT status FROM files")) == ["gone", "gone"]
        )
    )
    assert [d["status"] for d in docs(cfg)] == ["ingested", "ingested"]


def test_close_write_wins_over_a_stale_stat_from_a_rescan(
    state_dir: Path, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    """A rescan saw the file empty (mid-write); the writer then finished and closed it."""
    cfg = make_cfg(state_dir, quiet_period_s=600.0, rescan_interval_s=0.0)
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True)
    path = inbox / "growing.txt"
    path.write_text("")
    watcher = watcher_factory(cfg)
    assert watcher.rescan()["pending"] == 1  # recent mtime: pending, with its empty stat
    watcher.start()
    path.write_text(LOREM + " now complete")
    wait_for(lambda: len(docs(cfg)) == 1)
    assert docs(cfg)[0]["status"] == "ingested"


def test_file_appended_and_closed_every_few_hundred_ms_is_ingested_once_complete(
    state_dir: Path, watcher_factory: Callable[..., InboxWatcher]
) -> None:
    """Each append ends with a close-write; none of them may end the wait on its own."""
    cfg = make_cfg(state_dir, quiet_period_s=1.0, rescan_interval_s=0.0)
    changes: list[dict[str, Any]] = []
    watcher = watcher_factory(cfg, on_change=changes.append)
    watcher.start()
    path = Path(cfg.inbox_dir) / "appended.txt"
    lines = [f"entry {i}: {LOREM}" for i in range(10)]
    for line in lines:  # about 3 s of open, append, close
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        time.sleep(0.3)
    wait_for(lambda: len(docs(cfg)) >= 1 and watcher.pending() == 0)
    watcher.rescan(timeout=WAIT_S)  # anything still pending is settled by now
    all_docs = docs(cfg)
    assert len(all_docs) == 1, [d["n_tokens"] for d in all_docs]
    assert all_docs[0]["status"] == "ingested"
    assert text_of(cfg, all_docs[0]["id"]).count("entry ") == len(lines)
    assert sum(c["outcomes"]["ingested"] for c in changes) == 1
