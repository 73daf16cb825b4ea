"""The store side of watching an inbox: rescans, renames and removals.

A rescan walks the inbox and compares each file's stat with its ``files`` row, so an
unchanged file is never opened; paths the store knows that are no longer on disk are
marked gone (their documents are kept). Renames re-key the rows before the renamed file
is read, so its history follows it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat as stat_mod
import time
from collections.abc import Iterable

import sqlite_utils

from daemon.ingest.discover import iter_files, path_key
from daemon.ingest.stability import PendingFiles
from store import files
from store.db import transaction

log = logging.getLogger("evergreen.ingest.watcher")


def mark_gone(db: sqlite_utils.Database, track: str, gone: Iterable[tuple[str, bool]]) -> int:
    """Record ``(path, is_directory)`` entries that left the inbox; returns rows changed.

    Each is re-checked on disk first: a save-by-rename puts the path right back. Marked
    paths stop carrying their document (see :func:`store.files.mark_files_gone`).
    """
    paths: list[str] = []
    for path, directory in gone:
        candidates = (
            list(files.live_stats_under(db, path, track)) if directory else [path_key(path)]
        )
        paths.extend(p for p in candidates if not os.path.lexists(p))
    if not paths:
        return 0
    with transaction(db):
        n = files.mark_files_gone(db, paths)
    if n:
        log.info("%d file(s) left the inbox (their documents are kept)", n)
    return n


def apply_moves(db: sqlite_utils.Database, track: str, moves: list[tuple[str, str, bool]]) -> None:
    """Re-key the rows of renamed ``(src, dest, is_directory)`` paths, in event order."""
    with transaction(db):
        for src, dest, directory in moves:
            if directory:
                known = files.live_stats_under(db, src, track)
                pairs = [(p, dest + p[len(src) :]) for p in known]
            else:
                pairs = [(path_key(src), path_key(dest))]
            for old, new in pairs:
                if not os.path.lexists(old) and not files.rename_file(db, old, new):
                    files.mark_files_gone(db, [old])  # moved over another file


def scan(db: sqlite_utils.Database, track: str, root: str, pending: PendingFiles) -> int:
    """Mark files under ``root`` pending unless the store has them with the same stat;
    paths the store knows that are no longer there are marked gone. Returns files added.
    """
    known = files.live_stats_under(db, root, track)
    walked: set[str] = set()
    wall = time.time()
    added = 0
    for path in iter_files(root):
        key = path_key(path)
        walked.add(key)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat_mod.S_ISLNK(st.st_mode):
            with contextlib.suppress(OSError):  # a broken link is quarantined later
                st = os.stat(path)
        if known.get(key) == (st.st_size, st.st_mtime):
            continue
        added += pending.add_found(path, st, max(0.0, wall - st.st_mtime))
    missing = known.keys() - walked
    if missing:
        mark_gone(db, track, ((p, False) for p in missing))
    return added
