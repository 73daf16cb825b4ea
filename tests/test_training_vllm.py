"""A stage's adapter is served by the real vLLM CPU server (the serving work's fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.training import plan as plan_mod
from daemon.training import spawn
from store import stages
from store.db import open_db
from tests.fixtures_model import add_doc, make_tiny_cfg

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_stage_adapter_is_served_by_vllm(
    tmp_path: Path, tiny_seed_model: Path, vllm_server
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = make_tiny_cfg(
        state,
        tiny_seed_model,
        training={
            "epochs": 3.0,
            "max_seq_len": 128,
            "batch_tokens": 256,
            "eval_every": 0,
            "checkpoint_every": 100_000,  # only at the end (and on a stop)
        },
    )
    db = open_db(cfg.db_path)
    add_doc(db, [f"The vorpal number {i} hides in Zanthu{i}." for i in range(6)])
    sid = plan_mod.write_plan(cfg, db)
    assert sid is not None
    rc, _ = spawn.spawn_stage(cfg, sid)
    row = stages.get(db, sid)
    assert rc == 0 and row["status"] == "evaluated", row.get("reason")
    path = Path(row["plan"]["output_dir"])
    db.conn.close()

    ep = vllm_server.endpoint
    name = f"stage-test-{sid}-{tmp_path.name[-8:]}"
    ep.load_lora(name, path)
    try:
        assert ep.models().get(name) == str(path)
        text = ep.completion(name, "The vorpal number 1 hides in", max_tokens=6)
        assert isinstance(text, str)
    finally:
        ep.unload_lora(name)
