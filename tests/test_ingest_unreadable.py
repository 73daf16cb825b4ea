"""Inbox folders that cannot be listed are logged once, recorded and counted, not skipped
silently; the files the store knows inside them are not taken for deleted.

Tests run as root here, and root reads a ``chmod 000`` folder anyway. So when root, the
scan runs in a forked child that dropped to ``nobody`` first (a fork, not an exec: the
interpreter under /root is out of nobody's reach, the one already loaded is not); as
any other user the scan runs in-process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import config as config_mod
from daemon.config import Config
from daemon.ingest.pipeline import ingest_paths
from daemon.ingest.watcher import InboxWatcher
from store import files
from store.db import open_db
from tests.ingest_helpers import LOREM, rows

NOBODY = 65534
OLD = 1_600_000_000  # an mtime long settled: a rescan ingests at once


@pytest.fixture
def unprivileged_base() -> Iterator[Path]:
    """A directory nobody can reach (pytest's tmp_path is under root's 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="evergreen-unreadable-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for p in (path, *path.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def _cfg(base: Path) -> Config:
    return config_mod.from_dict(
        {"state_dir": str(base / "state"), "ingest": {"quiet_period_s": 0.3}}
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    os.utime(path, (OLD, OLD))


def as_unprivileged(
    base: Path, fn: Callable[[], dict[str, Any]], *, chown: bool = True
) -> dict[str, Any]:
    """``fn()`` as a user the permission bits apply to; returns what it returned.

    As root: in a forked child that became ``nobody``, after ``base`` was given to
    nobody (unless ``chown`` is false).
    """
    if os.geteuid() != 0:
        return fn()
    for p in (base, *base.rglob("*")) if chown else ():
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report through the pipe, never return
        os.close(read)
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = json.dumps(fn())
        except BaseException:
            out, code = json.dumps({"error": traceback.format_exc()}), 1
        with os.fdopen(write, "w") as fh:
            fh.write(out)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        out = fh.read()
    _, status = os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(out) if out else {"error": f"child status {status}"}
    assert "error" not in result, result["error"]
    return result


def _capture_warnings(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn``; the warnings the ``evergreen.ingest`` loggers logged meanwhile."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("evergreen.ingest")
    handler = Collect(logging.WARNING)
    level, disabled = logger.level, logger.disabled  # other tests configure logging
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled
    return seen


def _rescans_logging(cfg: Config, n: int) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        summaries: list[dict[str, Any]] = []
        seen = _capture_warnings(
            lambda: summaries.extend(InboxWatcher(cfg).rescan() for _ in range(n))
        )
        return {"warnings": seen, "summaries": summaries}

    return run


def _count(cfg: Config) -> int:
    with open_db(cfg.db_path) as db:
        return files.count_unreadable_dirs(db, cfg.track)


def test_unreadable_folder_is_logged_once_counted_and_its_files_kept(
    unprivileged_base: Path,
) -> None:
    base = unprivileged_base
    cfg = _cfg(base)
    inbox = Path(cfg.inbox_dir)
    _write(inbox / "ok.txt", LOREM + " readable")
    _write(inbox / "locked" / "known.txt", LOREM + " known before the folder was locked")
    assert InboxWatcher(cfg).rescan()["outcomes"]["ingested"] == 2  # as whoever we are

    _write(inbox / "ok2.txt", LOREM + " arrived while the folder was locked")
    _write(inbox / "listonly" / "new.txt", LOREM + " in a folder that can be listed only")
    (inbox / "locked").chmod(0o000)
    (inbox / "listonly").chmod(0o644)  # names readable, but no entry can be stat'ed
    result = as_unprivileged(base, _rescans_logging(cfg, 3))

    locked = str(inbox / "locked")
    warnings = [w for w in result["warnings"] if "cannot read inbox folder" in w]
    assert len(warnings) == 1 and locked in warnings[0], result["warnings"]
    assert "Permission denied" in warnings[0]
    events = rows(cfg, "SELECT * FROM events WHERE kind = 'ingest.unreadable_dir'")
    assert [(e["subject"], json.loads(e["data"])["reason"]) for e in events] == [
        (locked, "Permission denied")
    ]
    assert _count(cfg) == 1
    status = {Path(r["path"]).name: r["status"] for r in rows(cfg, "SELECT * FROM files")}
    # Out of sight is not deleted; the new readable file is in; the one that cannot be
    # stat'ed is quarantined with its reason, not dropped.
    assert status == {
        "ok.txt": "ingested",
        "known.txt": "ingested",
        "ok2.txt": "ingested",
        "new.txt": "quarantined",
    }
    (new,) = rows(cfg, "SELECT error FROM files WHERE path LIKE '%new.txt'")
    assert new["error"].startswith("unreadable:") and "Permission denied" in new["error"]

    (inbox / "locked").chmod(0o755)
    InboxWatcher(cfg).rescan()
    assert _count(cfg) == 0
    back = rows(cfg, "SELECT * FROM events WHERE kind = 'ingest.readable_dir'")
    assert [e["subject"] for e in back] == [locked]


def test_unreadable_inbox_itself_marks_nothing_gone(unprivileged_base: Path) -> None:
    base = unprivileged_base
    cfg = _cfg(base)
    inbox = Path(cfg.inbox_dir)
    _write(inbox / "a.txt", LOREM + " a")
    assert InboxWatcher(cfg).rescan()["outcomes"]["ingested"] == 1
    inbox.chmod(0o000)
    result = as_unprivileged(base, _rescans_logging(cfg, 2))
    assert sum("cannot read inbox folder" in w for w in result["warnings"]) == 1
    assert _count(cfg) == 1
    assert [r["status"] for r in rows(cfg, "SELECT status FROM files")] == ["ingested"]


def test_one_shot_ingest_of_a_folder_logs_its_unreadable_subfolder(unprivileged_base: Path) -> None:
    base = unprivileged_base
    cfg = _cfg(base)
    folder = base / "docs"
    _write(folder / "ok.txt", LOREM + " one-shot")
    _write(folder / "locked" / "hidden.txt", LOREM + " behind a locked folder")
    (folder / "locked").chmod(0o000)
    ingest_paths(cfg, [folder])  # as root first: lazy imports happen here, not as nobody

    def run() -> dict[str, Any]:
        got = _capture_warnings(lambda: ingest_paths(cfg, [folder]))
        return {"warnings": got}

    result = as_unprivileged(base, run)
    assert [w for w in result["warnings"] if "cannot read folder" in w] == [
        f"cannot read folder {folder / 'locked'} (Permission denied); its files are skipped"
    ]
