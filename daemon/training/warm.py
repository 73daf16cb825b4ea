"""A stage process started ahead of time, waiting for its stage (torch-free parent side).

Most of a small stage's start-up is the interpreter importing torch, transformers and peft
(4-6 s on 2 cores), which the freshness benchmark counts as pure overhead. The daemon keeps
one ``python -m daemon.training.stage --wait`` process imported and blocked on its stdin;
a stage is handed over as one JSON line, so it starts training almost at once. The warm
process reads its plan from the store only after it gets the stage id, so it can never run
stale settings. After each stage the daemon starts the next warm process.

Cost: one idle process holding the imported libraries (~300 MB RSS, no CPU). It exits by
itself when the daemon dies (EOF on stdin), and ``close()`` stops it on shutdown.
``training.prewarm = false`` turns this off.

Both ends of the hand-over live here: :class:`WarmTrainer` (daemon side, torch-free) writes
the order that :func:`wait_for_stage` (stage side) reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.config import Config

log = logging.getLogger("evergreen.training.warm")

RETRY_AFTER_CRASH_S = 60.0  # a warm process that died idle is not restarted on every wake


class WarmTrainer:
    """Holds at most one warm stage process; ``take`` hands it a stage, or returns None."""

    def __init__(self, cfg: Config, command: list[str], env: dict[str, str], cwd: str) -> None:
        self.cfg = cfg
        self.command = command  # runner.stage_command(cfg, None)
        self.env = env
        self.cwd = cwd
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._retry_at = 0.0

    def prewarm(self) -> None:
        """Start a warm process unless one is already alive (none under torchrun: its
        ranks start together with their stage, see README)."""
        if self.cfg.training.launcher != "local":
            return
        with self._lock:
            if self._proc is not None:
                rc = self._proc.poll()
                if rc is None:
                    return
                if rc != 0:  # it died before it got a stage: broken env, OOM kill, ...
                    log.warning(
                        "warm stage process exited with %s (see %s); stages start cold,"
                        " next try in %.0f s",
                        rc,
                        self.cfg.stages_dir / "warm.log",
                        RETRY_AFTER_CRASH_S,
                    )
                    self._retry_at = time.monotonic() + RETRY_AFTER_CRASH_S
                _stop(self._proc)
                self._proc = None
            if time.monotonic() < self._retry_at:
                return
            self.cfg.stages_dir.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.cfg.stages_dir / "warm.log", "ab") as err:
                    self._proc = subprocess.Popen(
                        self.command,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=self.env,
                        cwd=self.cwd,
                        text=True,
                        bufsize=1,
                    )
            except OSError as exc:  # stages then start cold, as without prewarm
                log.warning("cannot start a warm stage process: %s", exc)

    def take(self, stage_id: int, log_path: Path) -> subprocess.Popen[str] | None:
        """Give ``stage_id`` to the warm process and return it (now that stage's process);
        None when there is no live warm process (the caller starts one cold)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return None
        assert proc.stdin is not None
        try:
            proc.stdin.write(order(stage_id, log_path))
            proc.stdin.close()
        except OSError:  # it died between poll() and write: start cold instead
            _stop(proc)
            return None
        return proc

    def close(self) -> None:
        """Stop the warm process (SIGTERM; kill if it does not go within 2 s)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            _stop(proc)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None


def _stop(proc: subprocess.Popen[str]) -> None:
    """An idle warm process holds no state: SIGTERM ends it at once, even mid-import."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def order(stage_id: int, log_path: Path) -> str:
    """The one line that hands a stage to a warm process."""
    return json.dumps({"stage_id": stage_id, "log": str(log_path)}) + "\n"


def preload() -> None:
    """Import what every stage needs, up front (the bulk of a small stage's start-up)."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import daemon.training.device  # noqa: F401


def wait_for_stage() -> int | None:
    """Stage side: preload, then block until the daemon writes its :func:`order`.

    EOF (the parent closed the pipe, or died) means no stage is coming: None, and the
    process exits quietly. Stderr moves to the stage's own log once the stage is known.
    """
    preload()
    line = sys.stdin.readline()
    if not line.strip():
        return None
    got = json.loads(line)
    log_path = got.get("log")
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    return int(got["stage_id"])
