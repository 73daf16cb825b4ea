"""A corrupt database or a full disk is one line that names the file and the fix.

Real files: random bytes as the database, a real database with garbled pages, and a
real full file system (a small tmpfs, mounted as root; skipped only if mounting is
refused). The daemon's inbox worker logs such a problem once, as one line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import config as config_mod
from daemon.ingest.watcher import InboxWatcher
from store.db import MIGRATIONS, migrate, open_db
from store.errors import EvergreenError, StoreError

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 60.0


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_random_bytes_are_a_corrupt_database(tmp_path: Path) -> None:
    path = tmp_path / "evergreen.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError) as info:
        open_db(path)
    assert isinstance(info.value, EvergreenError)
    assert _one_line(info.value) == (
        f"database {path} is corrupt (file is not a database): "
        "restore it from a backup or move it away"
    )


def test_garbled_pages_behind_a_valid_header_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "evergreen.db"
    with open_db(path) as db:
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = 4096
    data = bytearray(path.read_bytes())
    data[page:] = b"\xa5" * (len(data) - page)  # keep page 1 (header + schema root)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as info:
        open_db(path)  # reading the migrations table meets a garbled page
    msg = _one_line(info.value)
    assert msg.startswith(f"database {path} is corrupt") and "move it away" in msg


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, to be filled by the test."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    finally:
        os.close(fd)


def test_new_database_on_a_full_disk(full_fs: Path) -> None:
    _fill(full_fs)
    path = full_fs / "evergreen.db"
    with pytest.raises(StoreError) as info:
        open_db(path)
    assert _one_line(info.value) == (
        f"disk full writing {path}: free space on its file system, then try again"
    )


def test_migrating_an_existing_database_on_a_full_disk(full_fs: Path) -> None:
    path = full_fs / "evergreen.db"
    db = open_db(path, apply_migrations=False)
    migrate(db.conn, MIGRATIONS[:1])  # an older schema: opening it must write
    db.conn.close()
    _fill(full_fs)
    with pytest.raises(StoreError) as info:
        open_db(path)
    assert _one_line(info.value).startswith(f"disk full writing {path}:")


def test_state_dir_on_a_full_disk(full_fs: Path) -> None:
    _fill(full_fs)
    path = full_fs / "deeper" / "than" / "before" / "evergreen.db"
    try:
        open_db(path)
    except StoreError as exc:
        assert _one_line(exc).startswith(f"disk full writing {path}:")
    else:  # pragma: no cover - tmpfs had an inode and a block to spare
        pytest.skip("the full tmpfs still took the directories and the database")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_inbox_worker_logs_a_corrupt_store_once_as_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "evergreen.db").write_bytes(os.urandom(8192))
    cfg = config_mod.from_dict({"state_dir": str(state), "ingest": {"quiet_period_s": 0.3}})
    logger = logging.getLogger("evergreen.ingest.watcher")
    handler = _Records()
    level, disabled = logger.level, logger.disabled  # other tests configure logging
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    logger.addHandler(handler)
    watcher = InboxWatcher(cfg)
    try:
        watcher.start()
        end = time.monotonic() + WAIT_S
        while not handler.records and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(3.5)  # a few more retries (one a second): none may log again
    finally:
        watcher.stop()
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled
    assert len(handler.records) == 1, [r.getMessage() for r in handler.records]
    record = handler.records[0]
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert "is corrupt (file is not a database)" in record.getMessage()
    assert str(state / "evergreen.db") in record.getMessage()


def test_cli_prints_one_line_for_a_corrupt_store(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "evergreen.db").write_bytes(os.urandom(8192))
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "--state-dir", str(state), "status"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "1000"},  # rich wraps at 80
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is corrupt (file is not a database)" in lines[0], done.stderr
