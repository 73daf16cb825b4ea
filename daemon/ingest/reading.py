"""Opening an inbox file safely: open once, then judge the descriptor, not the name.

Checking a name and then opening it again races: a symlink checked with ``realpath``
can be flipped to ``/etc/passwd`` before the open, and a hard link to an outside file is
a perfectly ordinary name inside the inbox. So a file is opened exactly once, and what
we read is judged by ``fstat`` of that descriptor:

- ``O_NOFOLLOW`` when the name was not a symlink (a name swapped for a link fails);
  ``O_NONBLOCK`` so a FIFO swapped in cannot hang the worker;
- a regular file;
- with a containment root: the name resolves inside the root *and* the resolved file is
  the very file we hold (same device and inode), so a flip after the open is caught too;
- on the root's filesystem, and with exactly one name (``st_nlink == 1``): a hard link
  may share its content with a file anywhere on the filesystem, so it is quarantined.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod

from daemon.ingest import parsers
from daemon.ingest.discover import inside
from daemon.ingest.parsers import Quarantine

_BASE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_checked(
    path: str, root: str | None, *, is_link: bool, hardlinks: bool = False
) -> tuple[int, os.stat_result]:
    """Open ``path`` once and return ``(fd, fstat)`` after the checks of the module docstring.

    ``is_link`` says whether the name was a symlink when stat'ed (links are followed only
    when the config allows, and the caller decided that already); ``hardlinks`` admits a
    file with several names (``ingest.follow_hardlinks``). Raises
    :class:`Quarantine` for a file that must not be read; the caller closes ``fd``.
    """
    flags = _BASE_FLAGS if is_link else _BASE_FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not is_link:
            raise Quarantine(parsers.UNREADABLE, "became a symlink while being opened") from None
        raise Quarantine(parsers.UNREADABLE, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        _check_descriptor(path, root, st, hardlinks)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of ``fd`` (one more than allowed reveals a grown file)."""
    chunks: list[bytes] = []
    left = limit + 1
    while left > 0:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            break
        chunks.append(block)
        left -= len(block)
    return b"".join(chunks)


def _check_descriptor(path: str, root: str | None, st: os.stat_result, hardlinks: bool) -> None:
    if not stat_mod.S_ISREG(st.st_mode):
        raise Quarantine(parsers.UNREADABLE, "not a regular file")
    if root is None:  # a file named on the command line: the user vouches for it
        return
    real_root = os.path.realpath(root)
    target = os.path.realpath(path)
    if not inside(target, real_root):
        raise Quarantine(parsers.OUTSIDE_INBOX, f"resolves to {target}")
    try:
        named = os.stat(target)
    except OSError:
        named = None
    if named is None or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
        raise Quarantine(parsers.OUTSIDE_INBOX, "changed while being opened")
    if st.st_dev != os.stat(real_root).st_dev:
        raise Quarantine(parsers.OUTSIDE_INBOX, "on another filesystem than the inbox")
    if st.st_nlink != 1 and not hardlinks:
        raise Quarantine(
            parsers.OUTSIDE_INBOX,
            f"hard link ({st.st_nlink} names): its content may live outside the inbox",
        )
