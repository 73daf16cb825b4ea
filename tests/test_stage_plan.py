"""The stage's inputs and reports without torch: typed plan, recipe, progress lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from daemon.config import TrainingConfig
from daemon.training import hparams
from daemon.training import plan as plan_mod
from daemon.training.report import Reporter, duration
from store import stages
from store.contracts import StagePlan
from store.db import open_db
from tests.fixtures_model import add_doc, make_tiny_cfg


def test_recipe_from_plan_drops_unknown_keys_and_defaults_missing_ones() -> None:
    hp = hparams.from_plan(
        {"lora_rank": 16, "learning_rate": 0.01, "min_steps": 7, "from_the_future": 1}
    )
    assert isinstance(hp, TrainingConfig)
    assert (hp.lora_rank, hp.learning_rate, hp.min_steps) == (16, 0.01, 7)
    assert hp.epochs == TrainingConfig().epochs  # missing: today's default
    # a plan from before min_steps existed resumes as it was planned: no minimum
    assert hparams.from_plan({}).min_steps == 0
    assert TrainingConfig().min_steps > 0


def test_recipe_round_trips_through_a_plan() -> None:
    cfg = TrainingConfig(lora_rank=32, target_modules=["q_proj"], eval_every=5)
    stored = json.loads(json.dumps(hparams.to_plan(cfg)))
    assert hparams.from_plan(stored) == cfg


def test_plan_is_typed_stored_as_json_and_old_plans_still_load(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    cfg = make_tiny_cfg(tmp_path / "state", base, training={"min_steps": 3})
    db = open_db(cfg.db_path)
    add_doc(db, ["alpha beta gamma", "delta epsilon"], holdout=["zeta eta"])
    sid = plan_mod.write_plan(cfg, db)
    assert sid is not None
    row = stages.get(db, sid)
    assert isinstance(row["plan"], dict)  # the runner reads the row's plan as a dict
    plan = StagePlan.from_json(row["plan"])
    assert plan.schema_version == StagePlan.SCHEMA_VERSION
    assert plan.stage_dir == str(cfg.stages_dir / str(sid))
    assert plan.output_version == "v0001" and len(plan.new_chunk_ids) == 2
    assert len(plan.holdout_chunk_ids) == 1
    assert hparams.from_plan(plan.hparams) == cfg.training
    # a plan stored as a dict by an older daemon: missing keys take their defaults
    old = StagePlan.from_json(json.dumps({"new_chunk_ids": [1, 2], "output_version": "v0003"}))
    assert old.new_chunk_ids == [1, 2] and old.replay_chunk_ids == []
    assert old.general_mix == 0.0 and old.eval_match == "contains"
    assert hparams.from_plan(old.hparams).min_steps == 0
    db.conn.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_every_few_seconds_and_at_every_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = open_db(tmp_path / "evergreen.db")
    sid = stages.create(db, {"new_chunk_ids": [1]})
    clock = FakeClock()
    rep = Reporter(db, sid, clock=clock)
    rep.start(0, 0, 100)
    for step in range(1, 101):
        clock.now += 0.4  # 0.4 s per step: 12.5 steps per log line
        if step == 30:
            rep.holdout(step, 100, 2.5, best=2.5, bad=0, patience=3)
        rep.step(step, 100, loss=3.0 - step / 100, lr=4e-3, tokens=step * 200)
    lines = capsys.readouterr().err.splitlines()
    steps = [int(m.group(1)) for ln in lines if (m := re.search(r"step (\d+)/100 loss", ln))]
    assert steps == [1, 14, 27, 30, 43, 56, 69, 82, 95, 100]
    assert any("step 30/100 holdout loss 2.500 (new best)" in ln for ln in lines)
    last = next(ln for ln in lines if "step 100/100 loss" in ln)
    assert "lr 4.0e-03 500 tok/s ETA 0s" in last
    progress = stages.get(db, sid)["progress"]
    assert {"step", "total", "loss", "tokens_per_s", "eta_s", "phase"} <= set(progress)
    assert progress["step"] == 100 and progress["phase"] == "train"
    db.conn.close()


def test_duration_reads_like_a_human_wrote_it() -> None:
    assert [duration(x) for x in (None, 42.2, 185, 4200)] == ["?", "42s", "3m05s", "1h10m"]
