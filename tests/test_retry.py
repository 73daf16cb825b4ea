"""Retries that learn from their rejection, on a real SQLite store without training: the
stage rows, metrics and verdicts are written through the store as the runner writes them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from daemon import config as config_mod
from daemon.config import Config
from daemon.scheduling import planning, retry
from daemon.training import plan as plan_mod
from store import documents, events, stages
from store.contracts import GateVerdict, StagePlan
from store.db import open_db, transaction
from tests.fixtures_model import add_doc

BASE = {"new_loss": 3.0, "retention_loss": 2.0, "general_loss": 2.0}
GENERAL_DRIFT = {**BASE, "new_loss": 2.5, "general_loss": 2.16}  # +8.0 %
RETENTION = {**BASE, "new_loss": 2.5, "retention_loss": 2.2}  # +10.0 %
NO_GAIN = {**BASE, "new_loss": 2.991}  # +0.3 % improvement, 1 % needed


def make_cfg(tmp_path: Path, **policy: Any) -> Config:
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    return config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "base_model": str(base),
            "policy": {"replay": {"name": "uniform", "ratio": 1.0}, **policy},
            "training": {
                "learning_rate": 4e-3,
                "general_mix": 0.25,
                "passes": 8.0,
                "min_steps": 100,
            },
        }
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite_utils.Database]:
    d = open_db(tmp_path / "state" / "evergreen.db")
    yield d
    d.conn.close()


def seed_data(db: sqlite_utils.Database) -> list[int]:
    """A learned document in the replay buffer (so retention exists) and a pending one."""
    with transaction(db):
        old = add_doc(db, ["an old fact " * 8], holdout=["old holdout " * 4], path="/i/old")
        rows = db.conn.execute("SELECT id FROM chunks WHERE document_id = ?", (old,))
        old_ids = [r[0] for r in rows]
        documents.mark_trained(db, old_ids, stage_id=0)
        documents.replay_add(db, "default", old_ids, capacity=10)
        add_doc(db, ["a new fact " * 20, "another new fact " * 20], path="/i/new")
    return [c["id"] for c in documents.pending_chunk_facts(db, "default")]


def plan_and_reject(cfg: Config, db: sqlite_utils.Database, candidate: dict[str, Any]) -> int:
    """Plan a stage, then reject it as the runner does: metrics, status, after_reject."""
    sid = plan_mod.write_plan(cfg, db)
    assert sid is not None
    with transaction(db):
        stages.merge_metrics(db, sid, {"candidate": candidate, "baseline": BASE})
        verdict = planning.gate(cfg, candidate, BASE)
        assert not verdict.promote
        stages.set_status(db, sid, stages.REJECTED, reason=verdict.summary)
    planning.after_reject(cfg, db, sid)
    return sid


def next_plan(cfg: Config, db: sqlite_utils.Database) -> StagePlan:
    sid = plan_mod.write_plan(cfg, db)
    assert sid is not None
    return StagePlan.from_json((stages.get(db, sid) or {})["plan"])


def retry_reason(plan: StagePlan) -> str:
    found = [r for r in plan.reasons if r.startswith("retry ")]
    assert len(found) == 1, plan.reasons
    return found[0]


def test_general_drift_lowers_lr_and_steps_and_mixes_more_general_text(
    tmp_path: Path, db: sqlite_utils.Database
) -> None:
    cfg = make_cfg(tmp_path)
    new_ids = seed_data(db)
    first = plan_and_reject(cfg, db, GENERAL_DRIFT)
    assert (stages.get(db, first) or {})["metrics"]["gate"]["failed_metrics"] == {
        "general_loss": "regressed"
    }
    plan = next_plan(cfg, db)
    assert plan.new_chunk_ids == new_ids
    hp = plan.hparams
    assert (hp["learning_rate"], hp["general_mix"], plan.general_mix) == (2e-3, 0.5, 0.5)
    assert (hp["passes"], hp["min_steps"]) == (4.0, 50)
    assert retry_reason(plan) == (
        "retry 1 of 2 after general drift +8.0%: learning_rate 4e-3 -> 2e-3,"
        " general_mix 0.25 -> 0.5, passes 8 -> 4, min_steps 100 -> 50"
    )
    assert plan.retry["attempt"] == 1 and plan.retry["causes"] == [["general"]]
    assert plan.replay_budget_tokens == plan.new_tokens  # ratio 1.0, unchanged
    (event,) = events.recent(db, kind_prefix=retry.EVENT_KIND)
    assert event["message"] == f"stage {first + 1}: {retry_reason(plan)}"
    # the configured recipe itself is untouched
    assert cfg.training.learning_rate == 4e-3


def test_retention_regression_lowers_lr_and_doubles_replay(
    tmp_path: Path, db: sqlite_utils.Database
) -> None:
    cfg = make_cfg(tmp_path)
    seed_data(db)
    plan_and_reject(cfg, db, RETENTION)
    plan = next_plan(cfg, db)
    assert plan.hparams["learning_rate"] == 2e-3
    assert plan.general_mix == 0.25 and plan.hparams["passes"] == 8.0
    assert plan.replay_budget_tokens == 2 * plan.new_tokens
    assert retry_reason(plan) == (
        "retry 1 of 2 after retention regression +10.0%: learning_rate 4e-3 -> 2e-3,"
        " replay budget x2"
    )


def test_no_new_data_improvement_takes_more_steps(
    tmp_path: Path, db: sqlite_utils.Database
) -> None:
    cfg = make_cfg(tmp_path)
    seed_data(db)
    plan_and_reject(cfg, db, NO_GAIN)
    plan = next_plan(cfg, db)
    assert plan.hparams["learning_rate"] == 4e-3
    assert (plan.hparams["passes"], plan.hparams["min_steps"]) == (16.0, 200)
    assert retry_reason(plan) == (
        "retry 1 of 2 after no new-data improvement (only +0.3%): passes 8 -> 16, min_steps 100 -> 200"
    )


def test_a_broken_evaluation_retries_the_same_recipe(
    tmp_path: Path, db: sqlite_utils.Database
) -> None:
    cfg = make_cfg(tmp_path)
    seed_data(db)
    broken = {k: v for k, v in GENERAL_DRIFT.items() if k != "general_loss"}
    plan_and_reject(cfg, db, {**broken, "general_loss": float("nan")})
    plan = next_plan(cfg, db)
    assert plan.hparams["learning_rate"] == 4e-3 and plan.general_mix == 0.25
    assert retry_reason(plan).endswith(": recipe unchanged")
    assert "a broken evaluation (general_loss)" in retry_reason(plan)


def test_adjustments_compound_then_the_data_is_set_aside_saying_what_was_tried(
    tmp_path: Path, db: sqlite_utils.Database
) -> None:
    cfg = make_cfg(tmp_path, max_retries=2)
    new_ids = seed_data(db)
    plan_and_reject(cfg, db, GENERAL_DRIFT)
    plan_and_reject(cfg, db, GENERAL_DRIFT)
    plan = next_plan(cfg, db)  # the second adapted retry, rejected below
    assert (plan.hparams["learning_rate"], plan.general_mix) == (1e-3, 1.0)
    assert retry_reason(plan).startswith(
        "retry 2 of 2 after general drift +8.0%; general drift +8.0%: learning_rate 4e-3 -> 1e-3"
    )
    sid = int((stages.latest(db, cfg.track) or {})["id"])
    with transaction(db):
        stages.merge_metrics(db, sid, {"candidate": GENERAL_DRIFT, "baseline": BASE})
        stages.set_status(db, sid, stages.REJECTED)
    result = planning.after_reject(cfg, db, sid)
    assert result["set_aside"] == new_ids and result["retry"] == []
    message = events.recent(db, kind_prefix=planning.REJECT_EVENT_KIND)[0]["message"]
    assert message == result["message"]
    assert "set aside after 2 adapted retries: general drift each time" in message
    assert "learning_rate 4e-3 -> 1e-3, general_mix 0.25 -> 1" in message
    assert documents.pending_chunk_facts(db, cfg.track) == []
    assert plan_mod.write_plan(cfg, db) is None  # nothing left to retry


def test_a_promotion_starts_over_from_the_configured_recipe(
    tmp_path: Path, db: sqlite_utils.Database
) -> None:
    cfg = make_cfg(tmp_path)
    seed_data(db)
    plan_and_reject(cfg, db, GENERAL_DRIFT)
    with transaction(db):  # some stage of the track is promoted after the rejection
        other = stages.create(db, {"new_chunk_ids": []})
        stages.set_status(db, other, stages.PROMOTED)
    plan = next_plan(cfg, db)
    assert plan.retry == {} and not any(r.startswith("retry ") for r in plan.reasons)
    assert plan.hparams == cfg.training.model_dump(mode="json")
    assert plan.general_mix == 0.25


def test_retry_off_when_rejected_data_is_dropped(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(tmp_path, on_reject="drop")
    seed_data(db)
    plan_and_reject(cfg, db, GENERAL_DRIFT)
    assert plan_mod.write_plan(cfg, db) is None


def test_a_verdict_with_only_texts_is_read_by_its_criteria(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    text_only = GateVerdict(
        failed=[
            "general loss 2.0000 → 2.1600 (+8.0%, allowed ≤ +5.0%)",
            "eval:facts 80.0 → 70.0 points (-10.0, allowed drop ≤ 5)",
            "retention_loss: missing from the candidate's metrics",
        ]
    )
    metrics = {"candidate": {"eval:facts": 70.0}, "baseline": {"eval:facts": 80.0}}
    row = {"id": 3, "plan": {}, "metrics": {"gate": text_only.to_dict(), **metrics}}
    r = retry.rejection(cfg, row)
    assert r.causes == ["general", "retention", "broken"]
    assert r.labels == [
        "general drift",
        "eval:facts drop 10.0 points",
        "a broken evaluation (retention_loss)",
    ]
