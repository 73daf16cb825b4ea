"""The seed corpus: docstrings and comments of the Python standard library on this machine.

It is the one text source guaranteed to exist offline wherever Evergreen runs. Files are
walked in sorted order and third-party dirs are skipped, so the corpus (and its hash) is
a function of the Python installation only.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """All ``.py`` files of the stdlib, sorted, without third-party or cache dirs."""
    root = root or stdlib_root()
    out: list[Path] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out.extend(Path(d) / f for f in sorted(files) if f.endswith(".py"))
    return sorted(out)


def _docstrings(src: str) -> list[str]:
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 20:
                out.append(doc.strip())
    return out


def _comment_blocks(src: str) -> list[str]:
    """Runs of consecutive comment lines joined into one text (decorative lines dropped)."""
    blocks: list[str] = []
    current: list[str] = []
    last_line = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            line = tok.start[0]
            if line != last_line + 1 and current:
                blocks.append(" ".join(current))
                current = []
            last_line = line
            if text and not text.startswith("!") and any(c.isalpha() for c in text):
                current.append(text)
    except (tokenize.TokenError, SyntaxError, ValueError):
        pass
    if current:
        blocks.append(" ".join(current))
    return [b for b in blocks if len(b) >= 20 and "coding" not in b[:30]]


def iter_texts(root: Path | None = None, max_chars: int = 0) -> Iterator[str]:
    """Docstrings, then comment blocks, file by file in sorted order (``max_chars`` caps)."""
    total = 0
    for path in stdlib_files(root):
        try:
            src = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for text in _docstrings(src) + _comment_blocks(src):
            yield text
            total += len(text)
            if max_chars and total >= max_chars:
                return


def corpus_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def split_holdout(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/holdout split by content hash (stable across corpus growth)."""
    train: list[str] = []
    hold: list[str] = []
    cut = int(fraction * 10_000)
    for t in texts:
        bucket = int(hashlib.sha1(t.encode("utf-8")).hexdigest()[:8], 16) % 10_000
        (hold if bucket < cut else train).append(t)
    return train, hold
