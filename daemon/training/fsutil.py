"""Atomic files and directories: write to a temp name in the same dir, fsync, rename.

A reader (vLLM, a restarted stage, the swapper) must never see a half-written adapter or
model, so directories become visible only once complete and synced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_temp_dir(final: Path) -> Path:
    """A fresh temp dir next to ``final`` (same filesystem, so rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def publish_dir(tmp: Path, final: Path, *, replace: bool = False) -> None:
    """fsync ``tmp`` and rename it to ``final``; an existing ``final`` is an error unless
    ``replace`` (then the old one is moved aside first and removed after)."""
    fsync_tree(tmp)
    old: Path | None = None
    if final.exists():
        if not replace:
            raise FileExistsError(f"{final} already exists")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as JSON to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(parent: Path) -> None:
    """Remove leftovers of interrupted atomic writes (``.<name>.tmp-*``)."""
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        if child.name.startswith(".") and (".tmp-" in child.name or ".old-" in child.name):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
