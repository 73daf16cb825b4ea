"""Files and directories only the daemon's user can read: 0600 files, 0700 dirs, whatever
the umask. The state dir holds the API key, the admin secret of the managed vLLM, the
effective config (which holds the key) and the store."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_umask() -> int:
    """Make every file this process and its children create private; returns the old mask.

    Stages, the seed build and vLLM inherit it, so adapters, checkpoints and logs are
    created 0600/0700 too.
    """
    return os.umask(PRIVATE_UMASK)


def mkdir_private(path: Path) -> None:
    """``mkdir -p`` whose new directories are 0700 (existing ones are left alone)."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically into ``path`` as a 0600 file (never readable by others,
    not even for a moment: the temporary file is created 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
