"""Stages that must be refused (#12): a NaN loss, a diverging run and a run that forgets
what was learned before are failed or rejected, never promoted; the current adapter and
the stored data stay as they were. Real store, tiny model, real stage subprocesses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.serving import promotion
from daemon.training import runner
from store import adapters, stages
from store.db import open_db
from tests.fixtures_model import add_doc, make_tiny_cfg

pytestmark = pytest.mark.slow

FACTS_A = [f"The glorp number {i} lives in Vantor{i} and eats red pebbles." for i in range(8)]
FACTS_B = [f"Quimbo river {i} flows into the Sea of Darl{i} every spring." for i in range(8)]
FACTS_C = [f"Tessel bell {i} rings at the hour of Morrow{i} in winter." for i in range(8)]
OPEN_GATE = {"name": "gate", "min_new_improvement": 0.0, "max_retention_regression": 1.0}
STRICT_GATE = {
    "name": "gate",
    "min_new_improvement": 0.0,
    "max_retention_regression": 0.0,  # any forgetting rejects
    "max_general_regression": 0.05,
}


def _cfg(state: Path, base: Path, gate: dict[str, Any], **training: Any) -> Config:
    t = {"epochs": 4.0, "learning_rate": 0.005, "max_seq_len": 128, "batch_tokens": 256}
    return make_tiny_cfg(
        state,
        base,
        training={**t, "eval_every": 0, "checkpoint_every": 100_000, **training},
        serving={"mode": "none"},
        policy={"promotion": gate, "replay": {"name": "uniform", "ratio": 0.0}},
    )


def _stage(cfg: Config) -> Any:
    db = open_db(cfg.db_path)
    try:
        return runner.run_stage(cfg, db, promote=lambda v, why: promotion.promote(cfg, v, why))
    finally:
        db.conn.close()


def test_nan_diverging_and_forgetting_stages_are_never_promoted(
    tmp_path: Path, tiny_seed_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    good = _cfg(state, tiny_seed_model, OPEN_GATE)
    db = open_db(good.db_path)
    add_doc(db, FACTS_A[:6], holdout=FACTS_A[6:])
    db.conn.close()
    assert _stage(good).status == "promoted"

    def current() -> str | None:
        db = open_db(good.db_path)
        try:
            return adapters.current(db, "default")
        finally:
            db.conn.close()

    assert current() == "v0001"
    db = open_db(good.db_path)
    add_doc(db, FACTS_B[:6], holdout=FACTS_B[6:])
    db.conn.close()

    # NaN at step 2 (the test hook in daemon/training/loop.py): failed, no adapter.
    monkeypatch.setenv("EVERGREEN_FAULT_NAN_STEP", "2")
    nan = _stage(_cfg(state, tiny_seed_model, STRICT_GATE))
    monkeypatch.delenv("EVERGREEN_FAULT_NAN_STEP")
    assert nan.status == "failed" and "non-finite" in nan.reason, nan

    # Diverging: the largest learning rate the config allows, many passes.
    diverging = _stage(_cfg(state, tiny_seed_model, STRICT_GATE, learning_rate=1.0, epochs=8.0))
    assert diverging.status in ("failed", "rejected"), diverging

    # Forgetting: a strong stage on new facts with no replay regresses retention of A.
    db = open_db(good.db_path)
    add_doc(db, FACTS_C[:6], holdout=FACTS_C[6:])
    db.conn.close()
    forgetting = _stage(_cfg(state, tiny_seed_model, STRICT_GATE, learning_rate=0.05, epochs=12.0))
    assert forgetting.status == "rejected", forgetting
    assert "retention" in forgetting.reason, forgetting.reason

    assert current() == "v0001"
    db = open_db(good.db_path)
    try:
        rows = [stages.get(db, r.stage_id) for r in (nan, diverging, forgetting)]
        assert all(r is not None and r["status"] != "promoted" for r in rows)
        promoted = [
            a["version"] for a in adapters.list_adapters(db, "default") if a["status"] == "promoted"
        ]
        assert promoted == ["v0001"]
    finally:
        db.conn.close()
