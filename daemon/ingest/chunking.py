"""Token-window chunking and the deterministic train/holdout split.

Chunks are measured in the base model's tokens (``<base model>/tokenizer.json``) so a
chunk fits the training sequence budget exactly. Before a model exists (the seed model is
built on first run) a byte-level fallback counts one token per UTF-8 byte, which is an
upper bound for any byte-level BPE, so chunks never come out larger than configured.

Cuts prefer a newline in the last half of a window, then a space in the last quarter, then
a hard cut (on a character boundary). The split is by hash of the chunk text, so identical
text always lands on the same side. Rule for short documents: a document never has *all*
its chunks in holdout; if the hashes say so, they all go to train instead, so a one-chunk
fact file is always learned.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from daemon.ingest.parsers import Segment
from store.documents import ChunkIn

TRAIN, HOLDOUT = "train", "holdout"

_lock = threading.Lock()
_tokenizers: dict[str, Any] = {}


def load_tokenizer(model_dir: Path) -> Any | None:
    """The model's ``tokenizers.Tokenizer``, cached per process; None when there is none yet.

    A missing file is not cached, so chunking switches to the real tokenizer as soon as the
    seed model has been built.
    """
    path = model_dir / "tokenizer.json"
    key = str(path)
    tok = _tokenizers.get(key)
    if tok is not None:
        return tok
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    with _lock:
        if key not in _tokenizers:
            try:
                _tokenizers[key] = Tokenizer.from_file(key)
            except Exception:  # a half-written or foreign tokenizer file: fall back to bytes
                return None
        return _tokenizers[key]


def split_of(text: str, holdout_fraction: float) -> str:
    """Deterministic split by the first 64 bits of the text's SHA-256."""
    if holdout_fraction <= 0:
        return TRAIN
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return HOLDOUT if h < holdout_fraction * 2**64 else TRAIN


class Chunker:
    """Cuts cleaned segments into :class:`ChunkIn` windows of at most ``chunk_tokens``."""

    def __init__(self, chunk_tokens: int, holdout_fraction: float, tokenizer: Any | None) -> None:
        self.n = chunk_tokens
        self.holdout_fraction = holdout_fraction
        self.tokenizer = tokenizer

    def chunk(self, segments: list[Segment]) -> list[ChunkIn]:
        hf = self.holdout_fraction
        chunks = [
            ChunkIn(text=t, n_tokens=n, split=split_of(t, hf), kind=k)
            for k, n, t in self._pieces(segments)
        ]
        if chunks and all(c.split == HOLDOUT for c in chunks):
            chunks = [replace(c, split=TRAIN) for c in chunks]
        return chunks

    def _pieces(self, segments: list[Segment]) -> Iterator[tuple[str, int, str]]:
        """``(kind, n_tokens, text)`` of every chunk, produced lazily."""
        for seg in segments:
            if seg.kind == "chat":
                text = json.dumps(seg.messages, ensure_ascii=False)
                body = "\n".join(m["content"] for m in seg.messages)
                yield ("chat", self.count(body), text)
            else:
                yield from (("text", n, t) for n, t in self.windows(seg.text))

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.encode("utf-8"))
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def windows(self, text: str) -> Iterable[tuple[int, str]]:
        """``(n_tokens, text)`` windows of ``text``, in order (lazily with a tokenizer)."""
        if self.tokenizer is None:
            return _byte_windows(text, self.n)
        return _token_windows(text, self.n, self.tokenizer)


def _byte_windows(text: str, n: int) -> list[tuple[int, str]]:
    data = text.encode("utf-8")
    if len(data) <= n:
        return [(len(data), text)] if text else []
    out: list[tuple[int, str]] = []
    start, end_all = 0, len(data)
    while start < end_all:
        hard = start + n
        if hard >= end_all:
            cut = end_all
        else:
            cut = data.rfind(b"\n", start + n // 2, hard + 1)
            if cut <= start:
                cut = data.rfind(b" ", start + 3 * n // 4, hard + 1)
            if cut <= start:
                cut = hard
                while cut > start and (data[cut] & 0xC0) == 0x80:  # not mid-character
                    cut -= 1
                if cut == start:
                    cut = hard
        piece = data[start:cut].strip()
        if piece:
            out.append((len(piece), piece.decode("utf-8", "replace")))
        start = cut
    return out


SLICE_CHARS = 1 << 16  # characters encoded at a time: bounds the tokenizer's memory


def _token_windows(
    text: str, n: int, tokenizer: Any, slice_chars: int = SLICE_CHARS
) -> Iterator[tuple[int, str]]:
    """Windows of at most ``n`` tokens, produced lazily a slice of the text at a time.

    Encoding a whole document at once holds every token's offsets as Python objects
    (a 5 MB text cost over 1 GB). Instead a slice of ``slice_chars`` is encoded, windows
    are cut from its first part, and the slice's last ``2 * n`` tokens are left for the
    next slice: a token at a slice's edge may change once the text goes on, and a cut
    looks up to a window ahead. A short text is one slice, cut exactly as before.
    """
    pos, length = 0, len(text)
    span = max(slice_chars, 4 * n)
    while pos < length:
        end = min(pos + span, length)
        part = text[pos:end]
        offsets: list[tuple[int, int]] = tokenizer.encode(part, add_special_tokens=False).offsets
        total = len(offsets)
        if end == length:
            if pos == 0 and total <= n and text == text.strip():
                yield (total, text)  # one window, already exact: no re-encode
                return
            yield from _slice_windows(part, offsets, n, tokenizer, total)
            return
        if total <= 2 * n:  # too few tokens to cut anything safely: take a longer slice
            span *= 2
            continue
        consumed = yield from _slice_windows(part, offsets, n, tokenizer, total - 2 * n)
        pos += offsets[consumed][0]


def _slice_windows(
    part: str, offsets: list[tuple[int, int]], n: int, tokenizer: Any, limit: int
) -> Generator[tuple[int, str], None, int]:
    """Windows of ``part`` starting before token ``limit``; returns the next token index."""
    total = len(offsets)
    starts = [o[0] for o in offsets]
    start = 0
    while start < limit:
        end = min(start + n, total)
        if end < total:
            end = _best_cut(part, starts, start, end, n)
        yield from _exact_pieces(part, offsets, start, end, n=n, tokenizer=tokenizer)
        start = end
    return start


def _exact_pieces(
    text: str, offsets: list[tuple[int, int]], start: int, end: int, *, n: int, tokenizer: Any
) -> list[tuple[int, str]]:
    """The text of tokens [start, end) with its exact re-encoded token count.

    A substring can tokenize differently at its edges (a stripped leading space splits a
    word), and n_tokens must be exact for packing: in the rare case the re-encoded piece
    is over budget, it is shortened token by token and the rest becomes the next piece.
    """
    out: list[tuple[int, str]] = []
    while start < end:
        cut = end
        while True:
            piece = text[offsets[start][0] : offsets[cut - 1][1]].strip()
            count = len(tokenizer.encode(piece, add_special_tokens=False).ids) if piece else 0
            if count <= n or cut - start <= 1:
                break
            cut -= 1
            while cut > start + 1 and offsets[cut][0] == offsets[cut - 1][0]:
                cut -= 1  # not between the byte tokens of one character
        if piece:
            out.append((count, piece))
        start = cut
    return out


def _best_cut(text: str, starts: list[int], start: int, end: int, n: int) -> int:
    """Token index to cut before: the last line start in the window's second half, else
    the last word start in its last quarter, else ``end`` (kept off a character's middle,
    where byte-level tokens share one character's offsets). ``str.rfind`` + bisect, so a
    window costs O(log n), not a Python loop over its tokens."""
    hi = starts[end] + 1
    for lo_tok, seps in ((start + n // 2 + 1, "\n"), (start + 3 * n // 4 + 1, " \t\n")):
        lo = max(starts[lo_tok] - 1, 0)
        pos = max(text.rfind(sep, lo, hi) for sep in seps)
        if pos < 0:
            continue
        k = bisect.bisect_right(starts, pos) - 1
        cut = k if k >= 0 and starts[k] == pos else k + 1
        if lo_tok <= cut <= end:
            return cut
    cut = end
    while cut > start + 1 and starts[cut] == starts[cut - 1]:
        cut -= 1
    return cut
