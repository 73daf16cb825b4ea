"""The one base class for failures a user can act on, and the store's own.

It lives in ``store``, the bottom layer, so that every layer (store, policies, daemon)
derives its errors from the same class without importing upwards. The CLI prints these
as one line and exits 1 (a traceback only with ``--debug``); the daemon logs them with
their message and keeps running where it can. Anything else that escapes is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

# Below this much free space an I/O error is taken for a full disk: SQLite reports a
# shared-memory file it cannot grow as SQLITE_IOERR_SHMSIZE, not SQLITE_FULL.
NEARLY_FULL_BYTES = 1 << 20


class EvergreenError(Exception):
    """An expected failure with a message that says what to do."""


class StoreError(EvergreenError, RuntimeError):
    """The store's database cannot be opened or written; the message names the file and
    what to do about it (see :func:`store_error`)."""


def store_error(exc: BaseException, path: str | os.PathLike[str]) -> StoreError | None:
    """The :class:`StoreError` for a failure of the database at ``path`` that the user can
    fix (disk full, a corrupt or foreign file, permissions, a lock held too long), or None
    for anything else (a bug, which keeps its traceback).
    """
    path = Path(path)
    if isinstance(exc, OSError):  # creating the database's directory
        if exc.errno == errno.ENOSPC:
            return StoreError(_disk_full(path))
        where = os.fsdecode(exc.filename) if exc.filename else str(path.parent)
        return StoreError(
            f"cannot create the directory of database {path}: {where}: {exc.strerror}"
        )
    if not isinstance(exc, sqlite3.Error):
        return None
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _nearly_full(path)):
        return StoreError(_disk_full(path))
    fix = _FIXES.get(code)
    if fix is None:
        return None
    what, todo = fix
    return StoreError(f"database {path} {what} ({exc}): {todo.format(dir=path.parent)}")


_FIXES: dict[int, tuple[str, str]] = {
    sqlite3.SQLITE_NOTADB: ("is corrupt", "restore it from a backup or move it away"),
    sqlite3.SQLITE_CORRUPT: ("is corrupt", "restore it from a backup or move it away"),
    sqlite3.SQLITE_CANTOPEN: ("cannot be opened", "check that {dir} is a writable directory"),
    sqlite3.SQLITE_READONLY: ("is read-only", "make it and {dir} writable for this user"),
    sqlite3.SQLITE_PERM: ("is not accessible", "make it and {dir} writable for this user"),
    sqlite3.SQLITE_IOERR: ("cannot be read or written", "check the disk and its file system"),
    sqlite3.SQLITE_BUSY: ("is locked", "another process holds it; try again"),
    sqlite3.SQLITE_LOCKED: ("is locked", "another process holds it; try again"),
}


def _disk_full(path: Path) -> str:
    return f"disk full writing {path}: free space on its file system, then try again"


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL_BYTES
