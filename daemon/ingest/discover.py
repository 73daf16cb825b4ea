"""Which paths are candidate documents, and how a path is named in the store.

Shared by the one-shot ``evergreen ingest`` (which expands its arguments) and the inbox
watcher (which walks the inbox on every rescan), so both skip the same names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

# Editors, downloaders and sync tools write these before the real file appears.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".swp", ".swx", ".crdownload", "~")


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary files are never ingested (they are not documents yet)."""
    return name.startswith((".", "~$", "#")) or name.lower().endswith(TEMP_SUFFIXES)


def path_key(path: str) -> str:
    """Paths are stored as text; undecodable bytes in a name are kept via surrogateescape."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def inside(target: str, root: str) -> bool:
    """Whether ``target`` is ``root`` or below it (both already absolute and resolved)."""
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def iter_files(root: str) -> Iterator[str]:
    """Every candidate file under ``root`` (sorted, hidden/temp skipped, dir links not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not is_ignored_name(name):
                yield os.path.join(dirpath, name)


def expand(paths: Iterable[Path | str]) -> list[tuple[str, str | None]]:
    """CLI arguments -> ``(file, containment root)``; a directory is its files' root."""
    out: list[tuple[str, str | None]] = []
    for arg in paths:
        p = os.path.abspath(arg)
        if os.path.isdir(p):
            out.extend((f, p) for f in iter_files(p))
        else:
            out.append((p, None))
    return out
