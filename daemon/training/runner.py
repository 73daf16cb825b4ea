"""The stage flow the daemon and ``evergreen train --now`` share (torch-free).

plan -> stage subprocess (progress lines -> ``on_progress``) -> metrics -> promotion gate ->
promote (pointer/swap, chunks trained, reservoir) | reject (data per ``policy.on_reject``)
| failed. Every transition goes through :func:`store.stages.set_status`, which records it.

Stopping: set ``stop_event``; the stage gets SIGTERM, checkpoints and exits, and stays
``running`` so :func:`resume_or_fail_running` (daemon startup) resumes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.training import plan as plan_mod
from daemon.training.warm import WarmTrainer
from store import adapters, documents, events, stages
from store.db import open_db, transaction

EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3  # mirrors daemon.training.stage
STOP_GRACE_S = 120.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]

ProgressFn = Callable[[dict[str, Any]], None]
SwapFn = Callable[[str, str], Any]  # (version, reason); moves the pointer once served


def stage_command(cfg: Config, stage_id: int | None) -> list[str]:
    """The stage subprocess; ``stage_id=None`` starts it warm (it reads the id from stdin)."""
    which = ["--wait"] if stage_id is None else ["--stage-id", str(stage_id)]
    return [sys.executable, "-m", "daemon.training.stage", *which, "--db", str(cfg.db_path)]


def warm_trainer(cfg: Config) -> WarmTrainer:
    """The daemon's warm stage process holder (same env and cwd as a cold stage)."""
    return WarmTrainer(cfg, stage_command(cfg, None), _env(), str(PROJECT_ROOT))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def spawn_stage(
    cfg: Config,
    stage_id: int,
    *,
    on_progress: ProgressFn | None = None,
    stop_event: threading.Event | None = None,
    timeout_s: float | None = None,
    warm: WarmTrainer | None = None,
) -> tuple[int, str]:
    """Run the stage subprocess to completion; returns (exit code, why it ended).

    With ``warm``, the stage goes to its waiting pre-imported process when there is one.
    """
    stage_dir = cfg.stages_dir / str(stage_id)
    stage_dir.mkdir(parents=True, exist_ok=True)
    timeout_s = cfg.training.stage_timeout_s if timeout_s is None else timeout_s
    with open(stage_dir / "stage.log", "ab") as log:
        proc = warm.take(stage_id, stage_dir / "stage.log") if warm is not None else None
        if proc is None:
            proc = subprocess.Popen(
                stage_command(cfg, stage_id),
                stdout=subprocess.PIPE,
                stderr=log,
                env=_env(),
                cwd=str(PROJECT_ROOT),
                text=True,
                bufsize=1,
            )
        reader = threading.Thread(target=_read_lines, args=(proc, on_progress), daemon=True)
        reader.start()
        started = time.monotonic()
        why = "exited"
        stop_sent = 0.0
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if not stop_sent and stop_event is not None and stop_event.is_set():
                why = "stopped"
            elif not stop_sent and elapsed > timeout_s:
                why = "timeout"
            if why != "exited" and not stop_sent:
                proc.send_signal(signal.SIGTERM)
                stop_sent = time.monotonic()
            if stop_sent and time.monotonic() - stop_sent > STOP_GRACE_S:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        reader.join(timeout=5)
    return proc.returncode, why


def _read_lines(proc: subprocess.Popen[str], on_progress: ProgressFn | None) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.strip()
        if not line.startswith("{") or on_progress is None:
            continue
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        with contextlib.suppress(Exception):  # a broken callback must not kill the stage
            on_progress(msg)


def run_stage(
    cfg: Config,
    db: sqlite_utils.Database,
    *,
    on_progress: ProgressFn | None = None,
    swap: SwapFn | None = None,
    stop_event: threading.Event | None = None,
    stage_id: int | None = None,
    warm: WarmTrainer | None = None,
) -> dict[str, Any]:
    """Plan (unless ``stage_id`` is given, e.g. a resume), train, evaluate and gate one stage.

    Returns ``{"stage_id", "status", "reason", "version", "metrics", "gate"}``; status is
    promoted | rejected | failed | interrupted (stopped; resumes later) | skipped.
    """
    if stage_id is None:
        try:
            stage_id = plan_mod.write_plan(cfg, db)
        except plan_mod.PlanError as exc:
            events.record(db, "stage.unplanned", str(exc), track=cfg.track)
            return {"stage_id": None, "status": "skipped", "reason": str(exc)}
        if stage_id is None:
            return {"stage_id": None, "status": "skipped", "reason": "nothing pending"}
    rc, why = spawn_stage(cfg, stage_id, on_progress=on_progress, stop_event=stop_event, warm=warm)
    return finish_stage(cfg, db, stage_id, rc, why, swap=swap)


def finish_stage(
    cfg: Config,
    db: sqlite_utils.Database,
    stage_id: int,
    rc: int,
    why: str = "exited",
    *,
    swap: SwapFn | None = None,
) -> dict[str, Any]:
    """Turn the subprocess outcome into the stage's final state."""
    row = stages.get(db, stage_id)
    if row is None:
        return {"stage_id": stage_id, "status": "failed", "reason": "stage row vanished"}
    status = row["status"]
    if (
        status in (stages.RUNNING, stages.TRAINED, stages.PLANNED)
        and why == "stopped"
        and rc in (EXIT_STOPPED, EXIT_OK, -signal.SIGTERM)
    ):
        return _result(row, "interrupted", "stopped; resumes from its checkpoint")
    if status == stages.EVALUATED:
        return _gate(cfg, db, row, swap)
    if status != stages.FAILED:
        reason = "timed out" if why == "timeout" else f"stage process exited with code {rc}"
        stages.set_status(db, stage_id, stages.FAILED, reason=reason)
    row = stages.get(db, stage_id) or row
    return _result(row, stages.FAILED, row.get("reason") or "failed")


def _result(row: dict[str, Any], status: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {
        "stage_id": row["id"],
        "status": status,
        "reason": reason,
        "version": row.get("candidate_version"),
        "metrics": row.get("metrics") or {},
        **extra,
    }


def _gate(
    cfg: Config, db: sqlite_utils.Database, row: dict[str, Any], swap: SwapFn | None
) -> dict[str, Any]:
    from daemon.scheduling import planning

    stage_id, version = int(row["id"]), row["candidate_version"]
    metrics = row.get("metrics") or {}
    verdict = planning.gate(cfg, metrics.get("candidate", {}), metrics.get("baseline", {}))
    decision = {**verdict.to_dict(), "fire": verdict.promote}
    reasons = decision.get("reasons") or []
    summary = str(decision.get("summary") or "; ".join(map(str, reasons)))
    if not decision.get("fire"):
        with transaction(db):
            adapters.set_status(db, version, adapters.REJECTED)
            stages.set_status(db, stage_id, stages.REJECTED, reason=summary)
        with contextlib.suppress(AttributeError):
            planning.after_reject(cfg, db, stage_id)
        return _result(stages.get(db, stage_id) or row, stages.REJECTED, summary, gate=decision)
    reason = f"stage {stage_id} passed the gate: {summary}"
    return promote_stage(cfg, db, stage_id, reason, swap=swap, summary=summary, gate=decision)


def promote_stage(
    cfg: Config,
    db: sqlite_utils.Database,
    stage_id: int,
    reason: str,
    *,
    swap: SwapFn | None = None,
    summary: str = "",
    gate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Make a stage's candidate current: swap (if given), move the pointer, mark the new
    chunks trained with their learned loss and offer them to the reservoir buffer."""
    row = stages.get(db, stage_id)
    if row is None or not row.get("candidate_version"):
        raise ValueError(f"stage {stage_id} has no candidate adapter")
    version = row["candidate_version"]
    if swap is not None:
        try:
            swap(version, reason)  # swaps serving, then moves the pointer
        except Exception as exc:
            why = f"promotion swap failed: {exc}"
            with transaction(db):
                adapters.set_status(db, version, adapters.REJECTED)
                stages.set_status(db, stage_id, stages.FAILED, reason=why)
            return _result(stages.get(db, stage_id) or row, stages.FAILED, why, gate=gate)
    new_ids = [int(i) for i in row["plan"].get("new_chunk_ids", [])]
    learned = documents.scores(db, version, new_ids)
    with transaction(db):
        if swap is None or adapters.current(db, cfg.track) != version:
            adapters.set_current(db, version, track=cfg.track, reason=reason)
        documents.mark_trained(db, new_ids, stage_id, learned)
        documents.replay_add(
            db,
            cfg.track,
            new_ids,
            capacity=cfg.training.replay_buffer_size,
            stage_id=stage_id,
            rng=random.Random(cfg.training.seed + stage_id),
        )
        stages.set_status(db, stage_id, stages.PROMOTED, reason=summary or reason)
    return _result(stages.get(db, stage_id) or row, stages.PROMOTED, summary or reason, gate=gate)


def score_chunks(
    cfg: Config,
    version: str | None,
    chunk_ids: list[int] | None = None,
    *,
    timeout_s: float = 1800.0,
) -> int:
    """Run the scorer subprocess: chunk losses under ``version`` (None = base) into
    ``chunk_scores`` (default chunks: pending train chunks + replay buffer). Returns its
    exit code."""
    cmd = [
        sys.executable,
        "-m",
        "daemon.training.score",
        "--db",
        str(cfg.db_path),
        "--base-model",
        str(cfg.resolved_base_model()),
        "--version",
        version or "",
        "--track",
        cfg.track,
        "--max-seq-len",
        str(cfg.training.max_seq_len),
    ]
    if chunk_ids:
        cmd += ["--chunks", ",".join(map(str, chunk_ids))]
    proc = subprocess.run(
        cmd,
        env=_env(),
        cwd=str(PROJECT_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return proc.returncode


def _pid_is_stage(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"daemon.training.stage" in cmd


def resume_or_fail_running(
    cfg: Config,
    db: sqlite_utils.Database,
    *,
    on_progress: ProgressFn | None = None,
    swap: SwapFn | None = None,
    stop_event: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Daemon startup: finish every stage left active by a previous run.

    ``evaluated`` stages are gated; ``planned``/``running``/``trained`` ones are resumed
    from their checkpoint (a stage without one starts over from its plan); a stage whose
    plan can no longer run (base model or parent gone) is marked failed with the reason.
    """
    out = []
    for row in stages.active(db, cfg.track):
        sid = int(row["id"])
        if _pid_is_stage(row.get("pid")):  # an orphan from the previous daemon: stop it
            with contextlib.suppress(OSError):
                os.kill(int(row["pid"]), signal.SIGTERM)
            for _ in range(int(STOP_GRACE_S * 5)):
                if not _pid_is_stage(row.get("pid")):
                    break
                time.sleep(0.2)
        if row["status"] == stages.EVALUATED:
            out.append(finish_stage(cfg, db, sid, EXIT_OK, swap=swap))
            continue
        plan = row["plan"]
        missing = [
            p
            for p in (plan.get("base_model"), plan.get("init_adapter"))
            if p and not Path(p).exists()
        ]
        if missing:
            stages.set_status(db, sid, stages.FAILED, reason=f"cannot resume: {missing[0]} is gone")
            out.append(_result(stages.get(db, sid) or row, stages.FAILED, "cannot resume"))
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
                cfg, db, on_progress=on_progress, swap=swap, stop_event=stop_event, stage_id=sid
            )
        )
    return out


def _serving_swap(cfg: Config) -> SwapFn | None:
    """``promote_version`` from the serving package when it exists (CLI foreground use)."""
    if cfg.serving.mode == "none":
        return None
    try:
        from daemon.serving.swap import promote_version
    except ImportError:
        return None
    return lambda version, reason: promote_version(cfg, version, reason)


def train_now(cfg: Config, progress: bool = True, swap: bool = True) -> dict[str, Any]:
    """``evergreen train --now``: one stage in the foreground with a rich progress bar."""
    if not cfg.base_model:
        from daemon.training.seed import ensure_seed_model

        ensure_seed_model(cfg, progress=progress)
    db = open_db(cfg.db_path)
    try:
        swap_fn = _serving_swap(cfg) if swap else None
        if not progress:
            return run_stage(cfg, db, swap=swap_fn)
        with _ProgressBar() as bar:
            return run_stage(cfg, db, swap=swap_fn, on_progress=bar.update)
    finally:
        db.conn.close()


class _ProgressBar:
    """rich bar fed by the stage's JSON progress lines."""

    def __enter__(self) -> _ProgressBar:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self._p.__enter__()
        self._task = self._p.add_task("stage", total=None, info="planning")
        return self

    def update(self, msg: dict[str, Any]) -> None:
        if msg.get("event") != "progress":
            return
        desc = f"stage {msg.get('stage_id')}"
        if msg.get("phase") == "evaluate":
            self._p.update(self._task, description=desc, info="evaluating")
            return
        loss = msg.get("loss")
        info = (
            f"loss {loss:.3f} · {msg.get('tokens_per_s', 0):.0f} tok/s"
            if isinstance(loss, float)
            else ""
        )
        self._p.update(
            self._task,
            description=desc,
            total=msg.get("total"),
            completed=msg.get("step", 0),
            info=info,
        )

    def __exit__(self, *exc: Any) -> None:
        self._p.__exit__(*exc)
