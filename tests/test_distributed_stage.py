"""Stages under torchrun (CPU, gloo) on the tiny model: real ranks, real store, real adapter."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import sqlite_utils

from daemon.config import Config
from daemon.serving import promotion
from daemon.training import runner
from store import adapters, stages
from store.contracts import StageResult
from store.db import open_db
from tests.fixtures_model import add_doc, make_tiny_cfg

pytestmark = pytest.mark.slow

FACTS = [f"The glorp number {i} lives in Vantor{i} and eats red pebbles." for i in range(8)]
MORE = [f"Quimbo river {i} flows into the Sea of Darl{i} every spring." for i in range(8)]
GATE = {
    "name": "gate",
    "min_new_improvement": 0.0,
    "max_retention_regression": 1.0,
    "max_general_regression": 1.0,
    "max_eval_drop_points": 100.0,
}


def _cfg(state: Path, base: Path, launcher: str, **training: object) -> Config:
    state.mkdir(parents=True, exist_ok=True)
    t = {
        "epochs": 4.0,
        "learning_rate": 0.005,
        "max_seq_len": 64,
        "batch_tokens": 64,
        "grad_accum": 2,  # global micro-batches per step: one per rank with 2 ranks
        "eval_every": 0,
        "checkpoint_every": 100_000,
        "launcher": launcher,
        "nproc_per_node": 2,
        **training,
    }
    return make_tiny_cfg(
        state, base, training=t, serving={"mode": "none"}, policy={"promotion": GATE}
    )


def _promote(cfg: Config):
    return lambda version, reason: promotion.promote(cfg, version, reason)


def _one_stage(cfg: Config) -> tuple[dict, Path]:
    db = open_db(cfg.db_path)
    try:
        add_doc(db, FACTS[:6], holdout=FACTS[6:])
        res = runner.run_stage(cfg, db, promote=_promote(cfg))
        assert res.status == "promoted", res
        return res.metrics, cfg.adapters_dir / str(res.version)
    finally:
        db.conn.close()


def test_two_ranks_match_one_process_on_the_same_plan(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, _ = _one_stage(_cfg(tmp_path / "one", tiny_seed_model, "local"))
    two, path = _one_stage(_cfg(tmp_path / "two", tiny_seed_model, "torchrun"))
    assert two["training"]["processes"] == 2 and one["training"]["processes"] == 1
    assert two["training"]["steps"] == one["training"]["steps"]
    assert two["training"]["tokens_trained"] == one["training"]["tokens_trained"]
    base, l1, l2 = (
        one["baseline"]["new_loss"],
        one["candidate"]["new_loss"],
        two["candidate"]["new_loss"],
    )
    assert l1 < base - 0.05  # it learned
    assert abs(l2 - l1) / l1 < 0.05, (l1, l2)  # the holdout loss of two ranks within 5 %
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_seed_model), path)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    log = (path.parent.parent / "stages" / "1" / "stage.log").read_text()
    assert "rank 1/2" in log and "Traceback" not in log.split("published")[0]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def kill_rank1_mid_stage(cfg: Config, db: sqlite_utils.Database) -> StageResult:
    """Run a stage (of the pending data), SIGKILL rank 1 once it trains; its result."""
    seen: list[dict] = []
    got: list = []
    t = threading.Thread(
        target=lambda: got.append(
            runner.run_stage(cfg, db, promote=_promote(cfg), on_progress=seen.append)
        )
    )
    t.start()
    try:
        deadline = time.time() + 300
        while not any((m.get("step") or 0) >= 2 for m in seen):
            assert time.time() < deadline and t.is_alive(), "the stage never trained"
            time.sleep(0.2)
        rank0 = int(stages.get(db, 1)["pid"])
        agent = int(Path(f"/proc/{rank0}/stat").read_text().rsplit(")", 1)[1].split()[1])
        (rank1,) = [p for p in _children(agent) if p != rank0]
        import os

        os.kill(rank1, signal.SIGKILL)
    finally:
        t.join(timeout=300)
    assert not t.is_alive()
    (res,) = got
    return res


def test_a_killed_rank_fails_the_stage_cleanly_and_the_next_stage_runs(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    cfg = _cfg(tmp_path, tiny_seed_model, "torchrun", epochs=400.0)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS[:6], holdout=FACTS[6:])
    res = kill_rank1_mid_stage(cfg, db)
    assert res.status == "failed", res
    row = stages.get(db, 1)
    assert row["status"] == "failed" and row["reason"]
    assert adapters.list_adapters(db, "default") == []
    assert not (cfg.adapters_dir / "v0001").exists()
    # the daemon goes on: the next stage (its data is still pending) trains and promotes
    db.conn.close()
    cfg2 = _cfg(tmp_path, tiny_seed_model, "torchrun", epochs=2.0)
    db = open_db(cfg2.db_path)
    add_doc(db, MORE[:6], holdout=MORE[6:])
    res2 = runner.run_stage(cfg2, db, promote=_promote(cfg2))
    assert res2.status == "promoted", res2
    assert res2.metrics["training"]["processes"] == 2
    db.conn.close()


def test_a_stopped_torchrun_stage_checkpoints_and_resumes(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    cfg = _cfg(tmp_path, tiny_seed_model, "torchrun", epochs=30.0)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS[:6], holdout=FACTS[6:])
    stop = threading.Event()

    def on_progress(msg: dict) -> None:
        if (msg.get("step") or 0) >= 2:
            stop.set()

    res = runner.run_stage(cfg, db, promote=_promote(cfg), on_progress=on_progress, stop_event=stop)
    assert res.status == "interrupted", res
    assert stages.get(db, res.stage_id)["status"] == "running"
    assert (cfg.stages_dir / str(res.stage_id) / "checkpoint" / "state.pt").is_file()
    (out,) = runner.resume_or_fail_running(cfg, db, promote=_promote(cfg))
    assert out.status == "promoted", out
    t = out.metrics["training"]
    assert t["resumed_from_step"] >= 2 and t["steps"] == t["total_steps"]
    db.conn.close()
