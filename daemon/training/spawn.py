"""The stage subprocess: its command line, its environment, and running it to the end.

Kept apart from the stage flow (:mod:`daemon.training.runner`) because the scorer and the
warm stage process start the same way: this package's root on ``PYTHONPATH``, our cwd.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.scheduling import placement
from daemon.training.warm import WarmTrainer

EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3  # mirrors daemon.training.stage
STOP_GRACE_S = 120.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]

ProgressFn = Callable[[dict[str, Any]], None]


def stage_command(cfg: Config, stage_id: int | None) -> list[str]:
    """The stage subprocess; ``stage_id=None`` starts it warm (it reads the id from stdin).

    With ``training.launcher = "torchrun"`` (and a stage id: there is no warm torchrun)
    PyTorch's launcher starts the ranks, and fails them all when one fails."""
    which = ["--wait"] if stage_id is None else ["--stage-id", str(stage_id)]
    stage = ["daemon.training.stage", *which, "--db", str(cfg.db_path)]
    tc = cfg.training
    if tc.launcher != "torchrun" or stage_id is None:
        return [sys.executable, "-m", *stage]
    if tc.rdzv_endpoint:
        rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", tc.rdzv_endpoint]
        rdzv += ["--rdzv-id", f"evergreen-{cfg.track}-{stage_id}"]
    else:
        rdzv = ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(tc.nproc_per_node),
        "--nnodes",
        str(tc.nnodes),
        *rdzv,
        "--max-restarts",
        "0",  # a failed rank fails the stage; the daemon's retry rules take it from there
        "--module",
        *stage,
    ]


def uses_torchrun(cfg: Config) -> bool:
    return cfg.training.launcher == "torchrun"


def warm_trainer(cfg: Config) -> WarmTrainer:
    """The daemon's warm stage process holder (same env and cwd as a cold stage)."""
    return WarmTrainer(cfg, stage_command(cfg, None), subprocess_env(cfg), str(PROJECT_ROOT))


def subprocess_env(cfg: Config | None = None, nproc: int = 1) -> dict[str, str]:
    """Our environment plus this package on ``PYTHONPATH`` (the daemon may run from
    anywhere) and, given ``cfg``, training's share of the machine (:mod:`placement`:
    cores, threads per process for ``nproc`` processes, niceness, GPUs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg is not None:
        env.update(placement.for_config(cfg).training_env(nproc))
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
    nproc = cfg.training.nproc_per_node if uses_torchrun(cfg) else 1
    with open(stage_dir / "stage.log", "ab") as log:
        proc = None
        if warm is not None and not uses_torchrun(cfg):
            proc = warm.take(stage_id, stage_dir / "stage.log")
        if proc is None:
            proc = subprocess.Popen(
                stage_command(cfg, stage_id),
                stdout=subprocess.PIPE,
                stderr=log,
                env=subprocess_env(cfg, nproc),
                cwd=str(PROJECT_ROOT),
                text=True,
                bufsize=1,
            )
        reader = threading.Thread(target=_read_lines, args=(proc, on_progress), daemon=True)
        reader.start()
        why = wait_or_stop(proc, stop_event, timeout_s)
        reader.join(timeout=5)
    if why == "stopped" and uses_torchrun(cfg) and proc.returncode != EXIT_OK:
        # torchrun exits non-zero when it is signalled, whatever its ranks did; the stage
        # row says whether they checkpointed (still running) or failed
        return EXIT_STOPPED, why
    return proc.returncode, why


def wait_or_stop(
    proc: subprocess.Popen[Any],
    stop_event: threading.Event | None,
    timeout_s: float,
    grace_s: float = STOP_GRACE_S,
) -> str:
    """Wait for ``proc``; on stop or timeout send SIGTERM (it checkpoints), SIGKILL after
    ``grace_s``. Returns why it ended: exited | stopped | timeout."""
    started = time.monotonic()
    why = "exited"
    stop_sent = 0.0
    while proc.poll() is None:
        if not stop_sent:
            if stop_event is not None and stop_event.is_set():
                why = "stopped"
            elif time.monotonic() - started > timeout_s:
                why = "timeout"
            if why != "exited":
                proc.send_signal(signal.SIGTERM)
                stop_sent = time.monotonic()
        elif time.monotonic() - stop_sent > grace_s:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    return why


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
