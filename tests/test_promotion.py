"""A stage that passed the gate is promoted by serving, and only then marked promoted.

Real store on disk and real adapter dirs; the runner gets serving's own promotion as its
``promote`` callable, as ``daemon/service.py`` and ``daemon/cli.py`` wire it. No vLLM: the
pointer moves alone (``serving.mode = none``), after the same validation a swap does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlite_utils
import torch
from safetensors.torch import save_file

from daemon import config as config_mod
from daemon.config import Config
from daemon.serving import promotion
from daemon.training.finish import promote_stage
from store import adapters, documents, stages
from store.contracts import GateVerdict
from store.db import open_db
from tests.fixtures_model import add_doc


def _adapter(path: Path, *, pickle: bool = False) -> Path:
    path.mkdir(parents=True)
    conf = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(conf))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(8, 8), f"{prefix}.lora_B.weight": torch.ones(8, 8)},
        str(path / "adapter_model.safetensors"),
    )
    if pickle:
        (path / "adapter_model.bin").write_bytes(b"not what a LoRA should carry")
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return config_mod.from_dict({"state_dir": str(tmp_path / "state"), "serving": {"mode": "none"}})


def _evaluated_stage(cfg: Config, db: sqlite_utils.Database, version: str, **kw: bool) -> int:
    """A stage whose candidate ``version`` has been trained and evaluated."""
    add_doc(db, [f"{version} fact number {i} about the river Quimbo." for i in range(3)])
    ids = [int(c["id"]) for c in documents.pending_chunks(db, cfg.track)]
    sid = stages.create(db, {"new_chunk_ids": ids})
    path = _adapter(cfg.adapters_dir / version, **kw)
    adapters.register(db, version, str(path), stage_id=sid)
    stages.set_status(db, sid, stages.EVALUATED, candidate_version=version)
    return sid


def _promote(cfg: Config):
    return lambda version, reason: promotion.promote(cfg, version, reason)


def test_promoted_stage_moves_pointer_then_marks_its_data(cfg: Config) -> None:
    db = open_db(cfg.db_path)
    sid = _evaluated_stage(cfg, db, "v0001")
    verdict = GateVerdict(promote=True, summary="new loss improved")
    result = promote_stage(cfg, db, sid, "test", promote=_promote(cfg), gate=verdict)
    assert result.status == "promoted" and result.version == "v0001"
    assert result.gate == verdict
    assert adapters.current(db, cfg.track) == "v0001"
    assert stages.get(db, sid)["status"] == stages.PROMOTED
    assert documents.pending_chunks(db, cfg.track) == []
    assert len(documents.replay_rows(db, cfg.track)) == 3
    db.conn.close()


def test_failed_promotion_leaves_pointer_and_data_where_they_were(cfg: Config) -> None:
    db = open_db(cfg.db_path)
    first = _evaluated_stage(cfg, db, "v0001")
    assert promote_stage(cfg, db, first, "test", promote=_promote(cfg)).status == "promoted"
    sid = _evaluated_stage(cfg, db, "v0002", pickle=True)
    result = promote_stage(cfg, db, sid, "test", promote=_promote(cfg))
    assert result.status == "failed"
    assert "pickle" in result.reason
    assert adapters.current(db, cfg.track) == "v0001"  # serving refused: pointer unchanged
    assert stages.get(db, sid)["status"] == stages.FAILED
    assert adapters.get(db, "v0002")["status"] == adapters.REJECTED
    assert len(documents.pending_chunks(db, cfg.track)) == 3  # its data trains again later
    db.conn.close()
