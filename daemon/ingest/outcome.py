"""What ingesting a file can come to: the outcome words, per-file records and summaries.

Kept apart from the code that decides them so the watcher, the CLI and the pipeline
share one vocabulary without importing each other's machinery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon.ingest.parsers import Quarantine
from store.documents import ChunkIn

INGESTED, DUPLICATE, UNCHANGED, QUARANTINED, IGNORED = (
    "ingested",
    "duplicate",
    "unchanged",
    "quarantined",
    "ignored",
)
SUPERSEDED = "superseded"
OUTCOMES = (INGESTED, DUPLICATE, UNCHANGED, SUPERSEDED, QUARANTINED, IGNORED)

OnOutcome = Callable[[str, str | None], None]


@dataclass(frozen=True)
class Outcome:
    """What happened to one file. ``reason`` is the quarantine reason class."""

    path: str
    outcome: str
    reason: str | None = None
    error: str | None = None
    document_id: int | None = None
    superseded_id: int | None = None
    revived: bool = False
    n_chunks: int = 0
    n_tokens: int = 0


@dataclass
class Prepared:
    """A file read and processed, ready to be applied to the store (no DB writes yet)."""

    path: str
    size: int = 0
    mtime: float = 0.0
    fmt: str = ""
    content_hash: str = ""
    chunks: list[ChunkIn] = field(default_factory=list)
    quarantine: Quarantine | None = None
    skip: str | None = None  # unchanged | ignored: nothing to write


class Summary:
    """Accumulates outcomes into the dict ``ingest_paths`` and ``on_change`` report."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.errors: list[dict[str, str]] = []
        self.files = 0
        self.chunks = 0
        self.tokens = 0
        self.started = time.monotonic()

    def add(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            self.files += 1
            self.counts[o.outcome] += 1
            if o.superseded_id is not None:
                self.counts[SUPERSEDED] += 1
            if o.outcome == QUARANTINED:
                self.errors.append({"path": o.path, "error": o.error or ""})
            self.chunks += o.n_chunks
            self.tokens += o.n_tokens

    @property
    def changed(self) -> bool:
        """Something new for training (new or revived content, or a new version)."""
        return self.counts[INGESTED] > 0 or self.counts[SUPERSEDED] > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcomes": dict(self.counts),
            "errors": self.errors,
            "files": self.files,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "seconds": round(time.monotonic() - self.started, 3),
        }
