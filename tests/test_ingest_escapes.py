"""Inbox escapes: what is read is the file that was checked, and only inbox content.

A symlink flipped to an outside file between the check and the open, and a hard link to
an outside file, must both be quarantined with a reason, their content never stored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.ingest import reading
from daemon.ingest.parsers import Quarantine
from daemon.ingest.pipeline import ingest_paths
from tests.ingest_helpers import LOREM, chunks, docs

SECRET = "Top secret payroll figures that live outside the inbox, never to be learned."


@pytest.fixture
def inbox(cfg: Config) -> Path:
    path = Path(cfg.inbox_dir)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET, encoding="utf-8")
    return path


def _nothing_secret_stored(cfg: Config) -> None:
    assert all("secret" not in c["text"] for c in chunks(cfg))
    assert all(d["status"] == "quarantined" or "secret" not in d["path"] for d in docs(cfg))


def test_symlink_flipped_to_an_outside_file_after_its_check_is_quarantined(
    cfg: Config, inbox: Path, secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the link points inside when checked and outside when opened."""
    (inbox / "real.txt").write_text(LOREM, encoding="utf-8")
    link = inbox / "flip.txt"
    link.symlink_to(inbox / "real.txt")
    real_open = reading.open_checked

    def flip_then_open(path: str, root: str | None, *, is_link: bool, **kw: Any) -> Any:
        if path == str(link):  # the attacker wins the race, right before the open
            tmp = inbox / ".flip.tmp"
            tmp.symlink_to(secret)
            os.replace(tmp, link)
        return real_open(path, root, is_link=is_link, **kw)

    monkeypatch.setattr(reading, "open_checked", flip_then_open)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 1 and summary["outcomes"]["quarantined"] == 1
    (err,) = summary["errors"]
    assert err["path"].endswith("flip.txt")
    assert err["error"] == f"outside_inbox: resolves to {secret.resolve()}"
    _nothing_secret_stored(cfg)


def test_hard_link_to_an_outside_file_is_quarantined_with_a_reason(
    cfg: Config, inbox: Path, secret: Path
) -> None:
    (inbox / "ok.txt").write_text(LOREM, encoding="utf-8")
    os.link(secret, inbox / "payroll.txt")
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 1 and summary["outcomes"]["quarantined"] == 1
    (err,) = summary["errors"]
    assert err["path"].endswith("payroll.txt")
    assert err["error"].startswith("outside_inbox: hard link (2 names)")
    _nothing_secret_stored(cfg)
    (quarantined,) = [d for d in docs(cfg) if d["status"] == "quarantined"]
    assert quarantined["content_hash"].startswith("quarantine:outside_inbox:")  # never read


def test_follow_hardlinks_admits_a_file_with_two_names_inside_the_inbox(
    cfg: Config, inbox: Path
) -> None:
    (inbox / "notes.txt").write_text(LOREM, encoding="utf-8")
    os.link(inbox / "notes.txt", inbox / "notes-copy.txt")
    refused = ingest_paths(cfg, [inbox])
    assert refused["outcomes"]["quarantined"] == 2, refused
    cfg.ingest.follow_hardlinks = True
    (inbox / "notes.txt").write_text(LOREM + " More.", encoding="utf-8")  # both names change
    admitted = ingest_paths(cfg, [inbox])
    assert admitted["outcomes"].get("quarantined", 0) == 0, admitted
    assert admitted["outcomes"]["ingested"] + admitted["outcomes"].get("duplicate", 0) == 2


def test_a_file_named_on_the_command_line_is_trusted_even_with_two_names(
    cfg: Config, tmp_path: Path
) -> None:
    """No containment root, no inbox to escape: the user named the file themselves."""
    path = tmp_path / "notes.txt"
    path.write_text(LOREM, encoding="utf-8")
    os.link(path, tmp_path / "backup.txt")
    summary = ingest_paths(cfg, [path])
    assert summary["outcomes"]["ingested"] == 1, summary


def test_a_fifo_swapped_in_for_a_file_never_blocks(cfg: Config, inbox: Path) -> None:
    """The name was a regular file when stat'ed; a FIFO is refused without hanging."""
    fifo = inbox / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(Quarantine, match="not a regular file"):
        fd, _ = reading.open_checked(str(fifo), str(inbox), is_link=False)
        os.close(fd)
