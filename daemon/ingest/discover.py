"""Which paths are candidate documents, and how a path is named in the store.

Shared by the one-shot ``evergreen ingest`` (which expands its arguments) and the inbox
watcher (which walks the inbox on every rescan), so both skip the same names.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger("evergreen.ingest")

# Editors, downloaders and sync tools write these before the real file appears.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".swp", ".swx", ".crdownload", "~")


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary files are never ingested (they are not documents yet)."""
    return name.startswith((".", "~$", "#")) or name.lower().endswith(TEMP_SUFFIXES)


def path_key(path: str) -> str:
    """The store's name for a file path: its bytes, losslessly, as text.

    A POSIX name is bytes; ``os.fsdecode`` keeps undecodable ones as lone surrogates,
    which SQLite text cannot hold. Each such byte becomes ``\\xNN`` and a backslash
    becomes two, so two names that differ only in their invalid bytes stay two keys,
    and :func:`key_path` gives the exact path back. Names without a backslash or an
    invalid byte (nearly all) are their own key. Escaping is per character, so the key
    of ``dir + "/" + name`` is the key of ``dir``, a slash, and the key of ``name``.
    """
    if "\\" not in path and path.isascii():
        return path
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates no file name decodes to; kept as their bytes
        raw = path.encode("utf-8", "surrogatepass")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def key_path(key: str) -> str:
    """The file path a :func:`path_key` names (the inverse of it)."""
    if "\\" not in key:
        return key

    def unescape(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        return b"\\" if code == b"\\" else bytes([int(code[1:], 16)])

    return os.fsdecode(_ESCAPE.sub(unescape, key.encode("utf-8")))


def inside(target: str, root: str) -> bool:
    """Whether ``target`` is ``root`` or below it (both already absolute and resolved)."""
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def iter_files(root: str, on_unreadable: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Every candidate file under ``root`` (sorted, hidden/temp skipped, dir links not followed).

    A directory that cannot be listed (no permission, an I/O error) is skipped with its
    files, and ``on_unreadable(directory, reason)`` is told; one that vanished mid-walk
    (or became a file) is not unreadable, it is just no longer there.
    """

    def onerror(exc: OSError) -> None:
        if on_unreadable is not None and exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            on_unreadable(os.fsdecode(exc.filename or root), exc.strerror or str(exc))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not is_ignored_name(name):
                yield os.path.join(dirpath, name)


def _log_unreadable(directory: str, reason: str) -> None:
    log.warning("cannot read folder %s (%s); its files are skipped", path_key(directory), reason)


def expand(paths: Iterable[Path | str]) -> list[tuple[str, str | None]]:
    """CLI arguments -> ``(file, containment root)``; a directory is its files' root."""
    out: list[tuple[str, str | None]] = []
    for arg in paths:
        p = os.path.abspath(arg)
        if os.path.isdir(p):
            out.extend((f, p) for f in iter_files(p, _log_unreadable))
        else:
            out.append((p, None))
    return out
