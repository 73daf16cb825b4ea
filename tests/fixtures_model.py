"""Tiny seed model fixtures (owned by the training work).

``tiny_seed_model`` builds the real tiny seed model (same code path as production, ~0.7M
params) once per pytest session, in seconds. ``tiny_cfg`` is a config on a fresh state dir
whose ``base_model`` points at it, so stages and serving use that model without a build.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from daemon import config as config_mod
from daemon.config import Config


def make_tiny_cfg(state_dir: Path, base_model: Path, **overrides: object) -> Config:
    """A config for tests: tiny seed, given base model, fast ingest; ``overrides`` merge in."""
    data: dict[str, object] = {
        "state_dir": str(state_dir),
        "base_model": str(base_model),
        "ingest": {"quiet_period_s": 0.3, "chunk_tokens": 64},
        "seed": {"size": "tiny"},
        # Tests size their stages by epochs (passes = 0); the default floor (min_steps)
        # would make every stage of a test's few lines take many steps.
        # rank 16 keeps tests fast and fits the test servers' max_lora_rank; lr 4e-3 is
        # what the tests' stages were tuned with (the default, 2e-3, is real text's).
        "training": {"min_steps": 0, "passes": 0.0, "lora_rank": 16, "learning_rate": 4e-3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # type: ignore[dict-item]
        else:
            data[key] = value
    return config_mod.from_dict(data)


@pytest.fixture(scope="session")
def tiny_seed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny seed model dir (HF format), built once per session."""
    from daemon.training.seed import ensure_seed_model

    state = tmp_path_factory.mktemp("tiny-seed-state")
    cfg = config_mod.from_dict({"state_dir": str(state), "seed": {"size": "tiny"}})
    return ensure_seed_model(cfg)


@pytest.fixture
def tiny_cfg(tmp_path: Path, tiny_seed_model: Path) -> Config:
    """Config on a fresh temp state dir with ``base_model`` = the session's tiny seed model."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return make_tiny_cfg(state, tiny_seed_model)


def add_doc(
    db: Any,
    texts: list[str],
    *,
    holdout: Sequence[str] = (),
    kind: str = "text",
    track: str = "default",
    path: str | None = None,
) -> int:
    """Insert one ingested document with train chunks ``texts`` and holdout chunks."""
    import hashlib

    from store import documents

    chunks = [documents.ChunkIn(t, max(1, len(t) // 4), "train", kind) for t in texts]
    chunks += [documents.ChunkIn(t, max(1, len(t) // 4), "holdout", kind) for t in holdout]
    digest = hashlib.sha256("\x1e".join(texts + list(holdout)).encode()).hexdigest()
    return documents.insert_document(
        db,
        track=track,
        path=path or f"/inbox/{digest[:12]}.txt",
        content_hash=digest,
        size=sum(map(len, texts)),
        mtime=0.0,
        fmt="txt",
        chunks=chunks,
    )
