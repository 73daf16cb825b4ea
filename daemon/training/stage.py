"""One training stage, run as a subprocess: ``python -m daemon.training.stage --stage-id N``.

It reads its plan (a :class:`store.contracts.StagePlan`, and the chunks the plan names)
from the store and nothing else, then:

setup (base model, warm start from the parent adapter or a new LoRA:
:mod:`~daemon.training.lora`) -> pack new + replay data (:mod:`~daemon.training.stage_data`)
-> train (:mod:`~daemon.training.loop`) -> evaluate candidate and baseline
(:mod:`~daemon.training.stage_eval`) -> write the adapter dir atomically
(:mod:`~daemon.training.publish`) -> register it as a candidate.

Progress goes to stdout as JSON lines (for the parent's progress bar), to the stage row,
and as plain lines to stderr (``stage.log``): :mod:`~daemon.training.report`. SIGTERM
makes the stage checkpoint and exit with :data:`EXIT_STOPPED`, leaving it ``running`` so
it resumes from that checkpoint when started again with the same id. ``--wait`` starts
the process warm (:mod:`~daemon.training.warm`): imported, waiting for its stage id.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.scheduling import placement
from daemon.training import (
    distributed,
    fsdp,
    hparams,
    lifeline,
    loop,
    lora,
    publish,
    stage_data,
    stage_eval,
    warm,
)
from daemon.training.distributed import Ranks
from daemon.training.report import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    QuietReporter,
    Reporter,
    StageFailed,
    StageStopped,
    emit,
    say,
)
from store import adapters, documents, stages
from store.contracts import StagePlan
from store.db import open_db

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_STOPPED", "main", "run", "train_plan"]


@dataclass
class StopFlag:
    """Set by the SIGTERM handler, read by the loop after each step."""

    requested: bool = False


def train_plan(
    db: sqlite_utils.Database,
    stage_id: int,
    plan: StagePlan,
    stop: StopFlag,
    ranks: Ranks | None = None,
) -> tuple[str, dict[str, Any]] | None:
    """setup -> train -> evaluate -> publish -> register; returns (version, metrics).

    Under torchrun every rank trains its shard; rank 0 alone evaluates, publishes and
    registers, and the other ranks return None once training is done."""
    ranks = ranks or Ranks()
    if not plan.stage_dir or not plan.output_dir:
        raise StageFailed("the plan names no stage dir or output dir")
    hp = hparams.from_plan(plan.hparams)
    stage_dir = Path(plan.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    report = Reporter(db, stage_id) if ranks.main else QuietReporter(db, stage_id)
    say(f"stage {stage_id}: loading {plan.base_model} (adapter {plan.init_adapter or 'new'})")
    loaded = lora.load(plan, hp, stage_id)
    data = stage_data.load(db, plan, loaded.tok, hp, stage_id=stage_id, pad_id=loaded.pad_id)
    if ranks.main:
        stage_data.write_data_json(stage_dir, data)
    trainer = loop.Trainer(
        loaded,
        data,
        hp,
        stage_dir=stage_dir,
        report=report,
        stop_requested=lambda: stop.requested,
        ranks=ranks,
    )
    train_stats = trainer.run()
    if trainer.sharded:  # rank 0 evaluates and publishes a plain model, as one process does
        weights = fsdp.full_trainable(loaded.model)
        del trainer
        if ranks.main:
            loaded = fsdp.unsharded(loaded, plan, hp, stage_id, weights)
    if not ranks.main:
        return None
    train_stats["processes"] = ranks.world
    if ranks.active:
        train_stats["distributed"] = hp.distributed
    stages.set_status(db, stage_id, stages.TRAINED)
    report.phase("evaluate", "evaluating the candidate against its parent")
    metrics, chunk_losses = stage_eval.evaluate(db, plan, loaded, data, hp)
    metrics["training"] = train_stats
    say(f"stage {stage_id}: evaluated: {_summary(metrics)}")
    path = publish.publish(
        db,
        loaded.model,
        plan,
        stage_id,
        data_stats=data.stats,
        train_stats=train_stats,
        metrics=metrics,
    )
    _register(db, stage_id, plan, str(path), metrics=metrics, chunk_losses=chunk_losses)
    say(f"stage {stage_id}: published {plan.output_version} at {path}")
    return plan.output_version, metrics


def _summary(metrics: dict[str, Any]) -> str:
    """``new_loss 3.10 -> 2.50, ...`` (baseline -> candidate) for the log."""
    cand, base = metrics["candidate"], metrics["baseline"]
    keys = [k for k in cand if k.endswith("_loss") or k.startswith("eval:")]
    return ", ".join(f"{k} {base.get(k, float('nan')):.3f} -> {cand[k]:.3f}" for k in keys)


def _register(
    db: sqlite_utils.Database,
    stage_id: int,
    plan: StagePlan,
    path: str,
    *,
    metrics: dict[str, Any],
    chunk_losses: dict[int, float],
) -> None:
    """The published adapter becomes a candidate; the stage is evaluated."""
    version = plan.output_version
    adapters.register(
        db,
        version,
        path,
        track=plan.track,
        parent_version=plan.parent_version,
        stage_id=stage_id,
        metrics=metrics,
    )
    documents.put_scores(db, version, chunk_losses)
    stages.merge_metrics(db, stage_id, metrics)
    stages.set_status(db, stage_id, stages.EVALUATED, candidate_version=version)


def run(db: sqlite_utils.Database, stage_id: int, ranks: Ranks | None = None) -> int:
    """The whole stage; returns the process exit code. Never leaves a half adapter.

    Only rank 0 writes the stage's row; another rank's failure reaches rank 0 as a failed
    collective (or torchrun stops it), so the stage fails as one."""
    ranks = ranks or Ranks()
    row = stages.get(db, stage_id)
    if row is None:
        emit("error", message=f"no stage {stage_id}")
        return EXIT_FAILED
    if row["status"] not in (stages.PLANNED, stages.RUNNING, stages.TRAINED):
        emit("error", message=f"stage {stage_id} is {row['status']}; nothing to do")
        return EXIT_FAILED
    stop = StopFlag()
    signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "requested", True))
    if ranks.main:
        stages.set_status(db, stage_id, stages.RUNNING, pid=os.getpid())
    try:
        done = train_plan(db, stage_id, StagePlan.from_json(row["plan"]), stop, ranks)
    except StageStopped as exc:
        if ranks.main:
            stages.update_progress(db, stage_id, {"phase": "stopped", "reason": str(exc)})
            emit("stopped", stage_id=stage_id, reason=str(exc))
        say(f"stage {stage_id}: {exc}; checkpointed, resumes when started again")
        return EXIT_STOPPED
    except Exception as exc:  # any failure: clean failed state, no adapter
        reason = str(exc) if isinstance(exc, StageFailed) else f"{type(exc).__name__}: {exc}"
        if ranks.main:
            stages.set_status(db, stage_id, stages.FAILED, reason=reason)
            emit("failed", stage_id=stage_id, reason=reason)
        say(f"stage {stage_id}: failed (rank {ranks.rank}): {reason}")
        return EXIT_FAILED
    if done is not None:
        version, metrics = done
        emit("done", stage_id=stage_id, status=stages.EVALUATED, version=version, metrics=metrics)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    lifeline.die_with_parent()  # SIGTERM (checkpoint, exit) if the daemon is SIGKILLed
    ap = argparse.ArgumentParser(prog="python -m daemon.training.stage", description=__doc__)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage-id", type=int)
    which.add_argument(
        "--wait",
        action="store_true",
        help="Warm mode: import torch & co now, then read the stage to run from stdin.",
    )
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="Path of the store (evergreen.db).")
    where.add_argument("--state-dir", help="State dir holding evergreen.db.")
    args = ap.parse_args(argv)
    placed = placement.apply_from_env()  # before torch starts its threads
    if args.wait:
        args.stage_id = warm.wait_for_stage()
        if args.stage_id is None:
            return EXIT_OK
    db_path = Path(args.db) if args.db else Path(args.state_dir) / "evergreen.db"
    if not db_path.is_file():
        emit("error", message=f"no store at {db_path}")
        return EXIT_FAILED
    db = open_db(db_path)
    ranks = distributed.setup()
    where_ = f"rank {ranks.rank}/{ranks.world}, " if ranks.active else ""
    say(f"stage {args.stage_id}: {where_}{placed}")
    try:
        return run(db, args.stage_id, ranks)
    finally:
        ranks.close()
        db.conn.close()


if __name__ == "__main__":
    sys.exit(main())
