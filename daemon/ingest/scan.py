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

from daemon.ingest.discover import iter_files, key_path, path_key
from daemon.ingest.stability import PendingFiles
from store import events, files
from store.db import transaction

log = logging.getLogger("evergreen.ingest.watcher")


def mark_gone(db: sqlite_utils.Database, track: str, gone: Iterable[tuple[str, bool]]) -> int:
    """Record ``(path, is_directory)`` entries that left the inbox; returns rows changed.

    Each is re-checked on disk first: a save-by-rename puts the path right back. Marked
    paths stop carrying their document (see :func:`store.files.mark_files_gone`).
    """
    keys: list[str] = []
    for path, directory in gone:
        key = path_key(path)
        candidates = list(files.live_stats_under(db, key, track)) if directory else [key]
        keys.extend(k for k in candidates if not os.path.lexists(key_path(k)))
    if not keys:
        return 0
    with transaction(db):
        n = files.mark_files_gone(db, keys)
    if n:
        log.info("%d file(s) left the inbox (their documents are kept)", n)
    return n


def apply_moves(db: sqlite_utils.Database, track: str, moves: list[tuple[str, str, bool]]) -> None:
    """Re-key the rows of renamed ``(src, dest, is_directory)`` paths, in event order."""
    with transaction(db):
        for src, dest, directory in moves:
            src_key, dest_key = path_key(src), path_key(dest)
            if directory:  # keys escape per character: a key's prefix is its folder's key
                known = files.live_stats_under(db, src_key, track)
                pairs = [(k, dest_key + k[len(src_key) :]) for k in known]
            else:
                pairs = [(src_key, dest_key)]
            for old, new in pairs:
                if not os.path.lexists(key_path(old)) and not files.rename_file(db, old, new):
                    files.mark_files_gone(db, [old])  # moved over another file


def scan(db: sqlite_utils.Database, track: str, root: str, pending: PendingFiles) -> int:
    """Mark files under ``root`` pending unless the store has them with the same stat;
    paths the store knows that are no longer there are marked gone. Returns files added.

    Folders that cannot be listed are recorded (:func:`record_unreadable_dirs`), and the
    files the store knows below them are *not* marked gone: they are out of sight, not
    deleted. A file that cannot even be stat'ed is pending at once when the store has
    never seen it, so the pipeline quarantines it with its reason.
    """
    known = files.live_stats_under(db, path_key(root), track)
    unreadable: dict[str, str] = {}
    walked: set[str] = set()
    wall = time.time()
    added = 0
    for path in iter_files(root, unreadable.__setitem__):
        key = path_key(path)
        walked.add(key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError:
            if key not in known:
                pending.add_unreadable(path)
            continue
        if stat_mod.S_ISLNK(st.st_mode):
            with contextlib.suppress(OSError):  # a broken link is quarantined later
                st = os.stat(path)
        if known.get(key) == (st.st_size, st.st_mtime):
            continue
        added += pending.add_found(path, st, max(0.0, wall - st.st_mtime))
    record_unreadable_dirs(db, track, root, unreadable)
    hidden = tuple(path_key(d).rstrip(os.sep) + os.sep for d in unreadable)
    missing = [k for k in known.keys() - walked if not k.startswith(hidden)]
    if missing:
        mark_gone(db, track, ((key_path(k), False) for k in missing))
    return added


def record_unreadable_dirs(
    db: sqlite_utils.Database, track: str, root: str, found: dict[str, str]
) -> None:
    """Bring the store's unreadable folders at or below ``root`` up to this scan.

    ``found`` maps each folder the scan could not list to the reason. A folder is logged
    and gets an ``ingest.unreadable_dir`` event once, when it first turns unreadable (not
    on every rescan), and an ``ingest.readable_dir`` event when it can be read again.
    Writes nothing when nothing changed.
    """
    now = {path_key(d): reason for d, reason in found.items()}
    before = files.unreadable_dirs_under(db, path_key(root), track)
    if now == before:
        return
    new = sorted(k for k in now if before.get(k) != now[k])
    back = sorted(before.keys() - now.keys())
    with transaction(db):
        for key in new:
            files.set_dir_unreadable(db, key, track, now[key])
            message = f"cannot read inbox folder {key} ({now[key]}); its files are skipped"
            data = {"reason": now[key]}
            events.record(db, "ingest.unreadable_dir", message, subject=key, track=track, data=data)
        for key in back:
            files.set_dir_readable(db, key)
            state = "can be read again" if os.path.isdir(key_path(key)) else "is gone"
            message = f"inbox folder {key} {state}"
            events.record(db, "ingest.readable_dir", message, subject=key, track=track)
    for key in new:
        log.warning("cannot read inbox folder %s (%s); its files are skipped", key, now[key])
    for key in back:
        log.info("inbox folder %s is no longer unreadable", key)
