"""How a stage ends: subprocess outcome -> gate -> promoted | rejected | failed.

The gate's verdict is a :class:`GateVerdict`; a candidate that passes is handed to the
``promote`` callable (version, reason) that ``daemon/service.py`` or ``daemon/cli.py``
injects: serving swaps it in and moves the store's current pointer, and raises when it
cannot (the pointer stays where it was). Only after it returns does training do its own
bookkeeping: the new chunks are marked trained with their learned losses, offered to the
reservoir replay buffer, and the stage becomes ``promoted``. If the daemon dies between the
two, the stage is still ``evaluated`` and is gated and promoted again at startup (a second
promotion of the same version is harmless).
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.scheduling import planning
from daemon.training.spawn import EXIT_OK, EXIT_STOPPED
from store import adapters, documents, stages
from store.contracts import GateVerdict, StagePlan, StageResult
from store.db import transaction

PromoteFn = Callable[[str, str], object]
"""(version, reason) -> anything; swaps ``version`` in and makes it current, or raises."""


def finish_stage(
    cfg: Config,
    db: sqlite_utils.Database,
    stage_id: int,
    rc: int,
    why: str = "exited",
    *,
    promote: PromoteFn,
) -> StageResult:
    """Turn the subprocess outcome into the stage's final state."""
    row = stages.get(db, stage_id)
    if row is None:
        return StageResult(stage_id=stage_id, status=stages.FAILED, reason="stage row vanished")
    status = row["status"]
    if (
        status in (stages.RUNNING, stages.TRAINED, stages.PLANNED)
        and why == "stopped"
        and rc in (EXIT_STOPPED, EXIT_OK, -signal.SIGTERM)
    ):
        return stage_result(row, "interrupted", "stopped; resumes from its checkpoint")
    if status == stages.EVALUATED:
        return _gate(cfg, db, row, promote)
    if status != stages.FAILED:
        reason = "timed out" if why == "timeout" else f"stage process exited with code {rc}"
        stages.set_status(db, stage_id, stages.FAILED, reason=reason)
    row = stages.get(db, stage_id) or row
    return stage_result(row, stages.FAILED, row.get("reason") or "failed")


def stage_result(
    row: dict[str, Any], status: str, reason: str, gate: GateVerdict | None = None
) -> StageResult:
    """The :class:`StageResult` of a stage row."""
    return StageResult(
        stage_id=row["id"],
        status=status,
        reason=reason,
        version=row.get("candidate_version"),
        metrics=row.get("metrics") or {},
        gate=gate,
    )


def gate_verdict(cfg: Config, metrics: dict[str, Any]) -> GateVerdict:
    """The promotion gate on a stage's metrics (candidate vs its parent)."""
    return planning.gate(cfg, metrics.get("candidate", {}), metrics.get("baseline", {}))


def _gate(
    cfg: Config, db: sqlite_utils.Database, row: dict[str, Any], promote: PromoteFn
) -> StageResult:
    stage_id, version = int(row["id"]), row["candidate_version"]
    verdict = gate_verdict(cfg, row.get("metrics") or {})
    if not verdict.promote:
        with transaction(db):
            adapters.set_status(db, version, adapters.REJECTED)
            stages.set_status(db, stage_id, stages.REJECTED, reason=verdict.summary)
        planning.after_reject(cfg, db, stage_id)
        row = stages.get(db, stage_id) or row
        return stage_result(row, stages.REJECTED, verdict.summary, verdict)
    reason = f"stage {stage_id} passed the gate: {verdict.summary}"
    return promote_stage(cfg, db, stage_id, reason, promote=promote, gate=verdict)


def promote_stage(
    cfg: Config,
    db: sqlite_utils.Database,
    stage_id: int,
    reason: str,
    *,
    promote: PromoteFn,
    gate: GateVerdict | None = None,
) -> StageResult:
    """Have serving make the stage's candidate current, then mark its new chunks trained
    with their learned loss and offer them to the reservoir buffer."""
    row = stages.get(db, stage_id)
    if row is None or not row.get("candidate_version"):
        raise ValueError(f"stage {stage_id} has no candidate adapter")
    version = row["candidate_version"]
    try:
        promote(version, reason)
    except Exception as exc:  # serving says why; the pointer did not move
        why = f"promotion failed: {exc}"
        with transaction(db):
            adapters.set_status(db, version, adapters.REJECTED)
            stages.set_status(db, stage_id, stages.FAILED, reason=why)
        return stage_result(stages.get(db, stage_id) or row, stages.FAILED, why, gate)
    new_ids = StagePlan.from_json(row["plan"]).new_chunk_ids
    learned = documents.scores(db, version, new_ids)
    summary = gate.summary if gate is not None and gate.summary else reason
    with transaction(db):
        documents.mark_trained(db, new_ids, stage_id, learned)
        documents.replay_add(
            db,
            cfg.track,
            new_ids,
            capacity=cfg.training.replay_buffer_size,
            stage_id=stage_id,
            rng=random.Random(cfg.training.seed + stage_id),
        )
        stages.set_status(db, stage_id, stages.PROMOTED, reason=summary)
    return stage_result(stages.get(db, stage_id) or row, stages.PROMOTED, summary, gate)
