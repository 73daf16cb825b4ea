"""Shared fixtures: real SQLite files on disk, temp state dirs, a tiny real model, real vLLM.

Area-specific fixtures live in their own modules (registered below) so each part of the
system owns its setup: ``fixtures_model`` builds the tiny seed model once per session,
``fixtures_vllm`` starts one real vLLM CPU server per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from daemon import config as config_mod
from daemon.config import Config
from store.db import open_db

pytest_plugins = ["tests.fixtures_model", "tests.fixtures_vllm"]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def cfg(state_dir: Path) -> Config:
    """Embedded defaults on a temp state dir; ingest settles fast for tests."""
    return config_mod.from_dict(
        {"state_dir": str(state_dir), "ingest": {"quiet_period_s": 0.3}, "seed": {"size": "tiny"}}
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "test.db"


@pytest.fixture
def fresh_db(db_path: Path) -> Iterator[sqlite_utils.Database]:
    db = open_db(db_path)
    yield db
    db.conn.close()
