"""The stage flow the daemon and ``evergreen train --now`` share (torch-free).

plan -> stage subprocess (progress lines -> ``on_progress``) -> metrics -> promotion gate ->
promote (through the injected ``promote`` callable: serving swaps and moves the pointer;
then chunks trained, reservoir) | reject (data per ``policy.on_reject``) | failed. Every
transition goes through :func:`store.stages.set_status`, which records it.

Stopping: set ``stop_event``; the stage gets SIGTERM, checkpoints and exits, and stays
``running`` so :func:`resume_or_fail_running` (daemon startup) resumes it.

The pieces live next door: :mod:`~daemon.training.spawn` (the subprocess),
:mod:`~daemon.training.finish` (gate and promotion bookkeeping),
:mod:`~daemon.training.foreground` (``train --now`` with a progress bar).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.training import plan as plan_mod
from daemon.training.finish import PromoteFn, finish_stage, stage_result
from daemon.training.spawn import EXIT_OK, STOP_GRACE_S, ProgressFn, spawn_stage
from daemon.training.warm import WarmTrainer
from store import events, stages
from store.contracts import StagePlan, StageResult

__all__ = ["PromoteFn", "resume_or_fail_running", "run_stage"]


def run_stage(
    cfg: Config,
    db: sqlite_utils.Database,
    *,
    promote: PromoteFn,
    on_progress: ProgressFn | None = None,
    stop_event: threading.Event | None = None,
    stage_id: int | None = None,
    warm: WarmTrainer | None = None,
) -> StageResult:
    """Plan (unless ``stage_id`` is given, e.g. a resume), train, evaluate and gate one stage.

    ``promote(version, reason)`` is serving's promotion (swap, then pointer); it raises when
    the candidate cannot be served. Status: promoted | rejected | failed | interrupted
    (stopped; resumes later) | skipped (nothing planned).
    """
    if stage_id is None:
        try:
            stage_id = plan_mod.write_plan(cfg, db)
        except plan_mod.PlanError as exc:
            events.record(db, "stage.unplanned", str(exc), track=cfg.track)
            return StageResult(status="skipped", reason=str(exc))
        if stage_id is None:
            return StageResult(status="skipped", reason="nothing pending")
    rc, why = spawn_stage(cfg, stage_id, on_progress=on_progress, stop_event=stop_event, warm=warm)
    return finish_stage(cfg, db, stage_id, rc, why, promote=promote)


def _pid_is_stage(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"daemon.training.stage" in cmd


def _stop_orphan(row: dict[str, Any]) -> None:
    """A stage process left by the previous daemon: stop it (it checkpoints) and wait."""
    if not _pid_is_stage(row.get("pid")):
        return
    with contextlib.suppress(OSError):
        os.kill(int(row["pid"]), signal.SIGTERM)
    for _ in range(int(STOP_GRACE_S * 5)):
        if not _pid_is_stage(row.get("pid")):
            break
        time.sleep(0.2)


def resume_or_fail_running(
    cfg: Config,
    db: sqlite_utils.Database,
    *,
    promote: PromoteFn,
    on_progress: ProgressFn | None = None,
    stop_event: threading.Event | None = None,
) -> list[StageResult]:
    """Daemon startup: finish every stage left active by a previous run.

    ``evaluated`` stages are gated; ``planned``/``running``/``trained`` ones are resumed
    from their checkpoint (a stage without one starts over from its plan); a stage whose
    plan can no longer run (base model or parent gone) is marked failed with the reason.
    """
    out = []
    for row in stages.active(db, cfg.track):
        sid = int(row["id"])
        _stop_orphan(row)
        if row["status"] == stages.EVALUATED:
            out.append(finish_stage(cfg, db, sid, EXIT_OK, promote=promote))
            continue
        plan = StagePlan.from_json(row["plan"])
        missing = [p for p in (plan.base_model, plan.init_adapter) if p and not Path(p).exists()]
        if missing:
            stages.set_status(db, sid, stages.FAILED, reason=f"cannot resume: {missing[0]} is gone")
            out.append(stage_result(stages.get(db, sid) or row, stages.FAILED, "cannot resume"))
            continue
        events.record(
            db,
            "stage.resume",
            f"resuming stage {sid} ({row['status']})",
            subject=str(sid),
            track=cfg.track,
        )
        out.append(
            run_stage(
                cfg,
                db,
                promote=promote,
                on_progress=on_progress,
                stop_event=stop_event,
                stage_id=sid,
            )
        )
    return out
