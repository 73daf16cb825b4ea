"""File names that are not valid UTF-8 are stored losslessly, one key per name.

Two names that differ only in an invalid byte used to share one stored path (both bytes
became U+FFFD), so each rescan took one file for a new version of the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.ingest.discover import key_path, path_key
from daemon.ingest.watcher import InboxWatcher
from store.db import MIGRATIONS, migrate, open_db
from tests.ingest_helpers import LOREM, docs, rows

WAIT_S = 60.0


def _write_bytes_name(directory: Path, name: bytes, text: str) -> str:
    path = os.path.join(os.fsencode(directory), name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    old = 1_600_000_000  # settled long ago: a rescan ingests it at once
    os.utime(path, (old, old))
    return os.fsdecode(path)


@pytest.mark.parametrize(
    "name",
    [
        "plain.txt",
        "é-accent.md",
        "back\\slash.txt",
        "literal\\xff.txt",
        os.fsdecode(b"bad\xff.txt"),
        os.fsdecode(b"bad\xfe\xc3.txt"),
        os.fsdecode(b"\xed\xa0\x80-cesu.txt"),
    ],
)
def test_path_key_round_trips_and_is_text_sqlite_can_store(name: str) -> None:
    path = "/inbox/" + name
    key = path_key(path)
    key.encode("utf-8")  # no lone surrogates left
    assert key_path(key) == path
    assert key.startswith("/inbox/")  # escaping is per character: prefixes stay prefixes


def test_names_that_differ_only_in_invalid_bytes_have_distinct_keys() -> None:
    names = [b"a\xff.txt", b"a\xfe.txt", b"a\\xff.txt", b"a\\\\xff.txt", b"a\xef\xbf\xbd.txt"]
    keys = {path_key(os.fsdecode(b"/in/" + n)) for n in names}
    assert len(keys) == len(names)


@pytest.fixture
def watcher(cfg: Config) -> Iterator[InboxWatcher]:
    w = InboxWatcher(cfg)
    yield w
    w.stop()


def test_two_invalid_names_are_stored_once_each_and_a_rescan_changes_nothing(
    cfg: Config, watcher: InboxWatcher
) -> None:
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True)
    _write_bytes_name(inbox, b"notes\xff.txt", LOREM + " first file, byte ff")
    _write_bytes_name(inbox, b"notes\xfe.txt", LOREM + " second file, byte fe")
    first = watcher.rescan()
    assert first["outcomes"]["ingested"] == 2, first
    stored = rows(cfg, "SELECT path, status FROM files ORDER BY path")
    assert [r["status"] for r in stored] == ["ingested", "ingested"]
    assert sorted(Path(r["path"]).name for r in stored) == ["notes\\xfe.txt", "notes\\xff.txt"]

    for _ in range(2):
        again = watcher.rescan()
        assert again["found"] == 0 and again["files"] == 0, again
    assert [d["status"] for d in docs(cfg)] == ["ingested", "ingested"]
    assert rows(cfg, "SELECT * FROM events WHERE kind = 'ingest.superseded'") == []
    assert rows(cfg, "SELECT path, status FROM files ORDER BY path") == stored


def test_invalid_names_through_the_live_watcher_then_deleted(
    cfg: Config, watcher: InboxWatcher
) -> None:
    from tests.test_ingest_watcher import wait_for

    watcher.start()
    inbox = Path(cfg.inbox_dir)
    a = _write_bytes_name(inbox, b"live\xff.txt", LOREM + " live ff")
    _write_bytes_name(inbox, b"live\xfe.txt", LOREM + " live fe")
    wait_for(lambda: len(docs(cfg)) == 2)
    assert watcher.rescan(timeout=WAIT_S)["found"] == 0
    os.unlink(a)  # the deleted one is marked gone, by its exact name
    gone: Callable[[], list[dict[str, Any]]] = lambda: rows(  # noqa: E731
        cfg, "SELECT path FROM files WHERE status = 'gone'"
    )
    wait_for(lambda: len(gone()) == 1)
    assert gone()[0]["path"].endswith("live\\xff.txt")


def test_migration_escapes_the_backslashes_of_existing_keys(tmp_path: Path) -> None:
    db = open_db(tmp_path / "old.db", apply_migrations=False)
    try:
        migrate(db.conn, MIGRATIONS[:2])  # the schema before keys escaped a backslash
        for path in ("/in/back\\slash.txt", "/in/plain.txt"):
            db.conn.execute(
                "INSERT INTO files (path, size, mtime, status, seen_at) VALUES (?, 1, 1, 'ingested', 0)",
                (path,),
            )
        migrate(db.conn)
        got = sorted(r[0] for r in db.conn.execute("SELECT path FROM files"))
    finally:
        db.conn.close()
    assert got == sorted([path_key("/in/back\\slash.txt"), "/in/plain.txt"])
    assert path_key("/in/back\\slash.txt") == "/in/back\\\\slash.txt"
