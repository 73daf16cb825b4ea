"""Seed model sizes and the manifest that says a build is finished.

Each size fixes architecture and pretraining recipe, step count included, so a build is
a pure function of (size, seed, Python's stdlib): never of wall time. The manifest is
written last, so a directory with one is a finished build.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon.config import Config

MANIFEST = "seed_manifest.json"
GENERAL_HOLDOUT = "general_holdout.txt"
GENERAL_TRAIN = "general_train.txt"  # a slice of the training corpus, for general mixing


@dataclass(frozen=True)
class SeedSpec:
    """Architecture and pretraining recipe of one seed size."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    max_corpus_chars: int  # 0 = the whole stdlib corpus
    holdout_fraction: float = 0.02
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# head_dim is 64 or 32 (vLLM CPU attention supports both); vocab sizes are multiples of 64.
SPECS: dict[str, SeedSpec] = {
    "default": SeedSpec(
        vocab_size=8192,
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        intermediate_size=1024,
        seq_len=256,
        batch_size=8,
        steps=120,
        learning_rate=2e-3,
        max_corpus_chars=0,
    ),
    "small": SeedSpec(
        vocab_size=4096,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=704,
        seq_len=128,
        batch_size=16,
        steps=600,
        learning_rate=2e-3,
        max_corpus_chars=0,
    ),
    "tiny": SeedSpec(
        vocab_size=2048,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=352,
        seq_len=128,
        batch_size=8,
        steps=30,
        learning_rate=3e-3,
        max_corpus_chars=250_000,
    ),
}


def spec_for(cfg: Config) -> SeedSpec:
    spec = SPECS[cfg.seed.size]
    steps = int(getattr(cfg.seed, "steps", 0) or 0)
    if steps:
        spec = SeedSpec(**{**asdict(spec), "steps": steps})
    return spec


def is_built(path: Path, spec: SeedSpec | None = None) -> bool:
    """A finished build (and, given ``spec``, one made with the same step count)."""
    if not ((path / MANIFEST).is_file() and (path / "config.json").is_file()):
        return False
    if spec is None:
        return True
    try:
        return int(json.loads((path / MANIFEST).read_text())["steps"]) == spec.steps
    except (ValueError, KeyError, OSError):
        return False
