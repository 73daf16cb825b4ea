"""``state_dir`` / ``inbox_dir`` that are files, or below one: one line at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from daemon import config as config_mod
from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.ingest import DirectoryError, InboxWatcher, ensure_dirs, ingest_paths
from tests.test_ingest_unreadable import as_unprivileged, unprivileged_base  # noqa: F401


def _cfg(state: Path, inbox: Path | None = None) -> Config:
    data: dict[str, Any] = {"state_dir": str(state)}
    if inbox is not None:
        data["inbox_dir"] = str(inbox)
    return config_mod.from_dict(data)


def _message(exc: pytest.ExceptionInfo[DirectoryError]) -> str:
    assert isinstance(exc.value, EvergreenError)
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_dirs_are_created(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "a" / "state", tmp_path / "b" / "inbox")
    ensure_dirs(cfg)
    assert Path(cfg.state_dir).is_dir() and Path(cfg.inbox_dir).is_dir()
    ensure_dirs(cfg)  # and again: nothing to do


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    with pytest.raises(DirectoryError) as info:
        ensure_dirs(_cfg(state))
    assert _message(info) == (
        f"state_dir {state} is a file, not a directory:"
        " move the file away or set state_dir to a directory"
    )


def test_inbox_dir_that_is_a_file_stops_the_watcher_with_one_line(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.write_text("not a directory")
    watcher = InboxWatcher(_cfg(tmp_path / "state", inbox))
    with pytest.raises(DirectoryError) as info:
        watcher.start()
    assert not watcher.running
    assert _message(info).startswith(f"inbox_dir {inbox} is a file, not a directory:")


def test_inbox_dir_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file where a folder should be")
    inbox = tmp_path / "plain" / "inbox"
    with pytest.raises(DirectoryError) as info:
        ensure_dirs(_cfg(tmp_path / "state", inbox))
    assert _message(info).startswith(
        f"inbox_dir {inbox} cannot be created: {tmp_path / 'plain'} is a file, not a directory"
    )


def test_state_dir_that_is_a_broken_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DirectoryError) as info:
        ensure_dirs(_cfg(state))
    assert "is a broken symlink" in _message(info)


def test_one_shot_ingest_with_a_state_dir_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("")
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text long enough to be a document of its own.")
    with pytest.raises(DirectoryError) as info:
        ingest_paths(_cfg(state), [doc])
    assert _message(info).startswith(f"state_dir {state} is a file")


def test_state_dir_not_writable_by_this_user(unprivileged_base: Path) -> None:  # noqa: F811
    state = unprivileged_base / "state"
    state.mkdir()
    os.chmod(state, 0o555)
    cfg = _cfg(state, unprivileged_base / "inbox")
    (unprivileged_base / "inbox").mkdir()

    def run() -> dict[str, Any]:
        try:
            ensure_dirs(cfg)
        except DirectoryError as exc:
            return {"message": str(exc)}
        return {"message": ""}

    # As root, in a child that became nobody; the folders stay root's.
    got = as_unprivileged(unprivileged_base, run, chown=False)
    assert got["message"] == f"state_dir {state} is not writable by this user: fix its permissions"
