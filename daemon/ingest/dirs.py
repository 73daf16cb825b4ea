"""The state and inbox directories: there, and directories, before anything uses them.

Without this check a ``state_dir`` or ``inbox_dir`` that is a file (a typo, a stray
``touch``) surfaced as a ``FileExistsError`` traceback from deep inside whichever part
touched it first. :func:`ensure_dirs` runs at start and says in one line what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.config import Config
from daemon.errors import EvergreenError


class DirectoryError(EvergreenError, RuntimeError):
    """``state_dir`` or ``inbox_dir`` is not a usable directory; the message says why."""


def ensure_dirs(cfg: Config) -> None:
    """Create ``state_dir`` and ``inbox_dir`` when missing; :class:`DirectoryError` when
    either is a file, sits below a file, or cannot be created or used by this user.
    """
    ensure_dir("state_dir", Path(cfg.state_dir), writable=True)
    ensure_dir("inbox_dir", Path(cfg.inbox_dir), writable=False)


def ensure_dir(key: str, path: Path, *, writable: bool) -> None:
    """Create the directory ``path`` (config key ``key``) if missing, and check it.

    ``writable``: the daemon writes there (the state dir); otherwise reading is enough.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _first_non_directory(path)
        if blocker.is_symlink() and not blocker.exists():
            problem = f"cannot be created: {blocker} is a broken symlink"
        elif blocker == path:
            problem = "is a file, not a directory"
        else:
            problem = f"cannot be created: {blocker} is a file, not a directory"
        raise DirectoryError(
            f"{key} {path} {problem}: move the file away or set {key} to a directory"
        ) from None
    except OSError as exc:
        raise DirectoryError(
            f"{key} {path} cannot be created ({exc.strerror}): check the permissions"
            " of its parent directory"
        ) from None
    mode = os.R_OK | os.X_OK | (os.W_OK if writable else 0)
    if not os.access(path, mode):
        need = "writable" if writable else "readable"
        raise DirectoryError(f"{key} {path} is not {need} by this user: fix its permissions")


def _first_non_directory(path: Path) -> Path:
    """The first of ``path``'s ancestors (or itself) that exists and is not a directory."""
    for candidate in (*reversed(path.parents), path):
        if candidate.is_symlink() and not candidate.exists():
            return candidate  # a dangling link: mkdir cannot go through it either
        if candidate.exists() and not candidate.is_dir():
            return candidate
        if not candidate.exists():
            break
    return path
