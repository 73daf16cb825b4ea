"""How a stage subprocess talks to the outside: exit codes, JSON events, log lines.

Three audiences, three channels:

* the parent process (progress bar, runner) reads one JSON object per line on stdout
  (:func:`emit`);
* the store's stage row carries the latest progress (``step``, ``total``, ``loss``,
  ``tokens_per_s``, ``eta_s``, ``phase``) for ``evergreen status`` and metrics;
* a human reads ``stage.log`` (the subprocess's stderr, warm or cold): one plain line
  every few seconds, at every holdout evaluation and at each phase change, so a long stage
  is never a silent file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlite_utils

from store import stages
from store.errors import EvergreenError

EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3  # daemon.training.runner mirrors these
PROGRESS_EVERY_S = 0.5  # JSON progress and the store row (cheap, feeds a progress bar)
LOG_EVERY_S = 5.0  # plain log lines (a human reading stage.log)


class StageFailed(EvergreenError, RuntimeError):
    """The stage cannot produce a valid adapter (the reason is the message)."""


class StageStopped(Exception):
    """SIGTERM: the stage checkpointed and stops; it resumes when started again."""


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout for the parent process.

    A parent that died (a SIGKILLed daemon) closed the pipe: the stage goes on without a
    reader (the store row carries its progress) and ends as its signal says, stopped and
    resumable, instead of failing with BrokenPipeError.
    """
    try:
        print(json.dumps({"event": event, **fields}, default=str), flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # later lines (and the exit flush) go nowhere
        os.close(devnull)


def say(message: str) -> None:
    """One plain, timestamped line for ``stage.log`` (stderr)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


def duration(seconds: float | None) -> str:
    """``1h10m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(max(0.0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Reporter:
    """Progress of one stage on all three channels, throttled so that reporting costs
    nothing next to a training step. ``clock`` is injectable so tests need no sleeps."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        stage_id: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.stage_id = stage_id
        self.clock = clock
        self._t0 = clock()
        self._step0 = 0
        self._tok0 = 0
        self._last_json = -math.inf
        self._last_line = -math.inf

    def start(self, step: int, tokens: int, total: int) -> None:
        """Rates and ETA count from here (a resumed stage's earlier steps do not)."""
        self._t0, self._step0, self._tok0 = self.clock(), step, tokens
        how = f"resumed at step {step}" if step else "training"
        say(f"stage {self.stage_id}: {how}, {total} steps")

    def rates(self, step: int, tokens: int, total: int) -> tuple[float, float | None]:
        """(tokens per second, seconds left) since :meth:`start`."""
        elapsed = max(1e-9, self.clock() - self._t0)
        steps_per_s = (step - self._step0) / elapsed
        eta = (total - step) / steps_per_s if steps_per_s > 0 else None
        return (tokens - self._tok0) / elapsed, eta

    def step(self, step: int, total: int, *, loss: float, lr: float, tokens: int) -> None:
        """After each optimizer step; writes only when a channel is due (always at the
        first step after :meth:`start` and at the last)."""
        now = self.clock()
        edge = step >= total or step == self._step0 + 1
        json_due = edge or now - self._last_json >= PROGRESS_EVERY_S
        line_due = edge or now - self._last_line >= LOG_EVERY_S
        if not (json_due or line_due):
            return
        tok_s, eta = self.rates(step, tokens, total)
        if json_due:
            self._last_json = now
            prog = {
                "step": step,
                "total": total,
                "loss": loss,
                "lr": lr,
                "tokens": tokens,
                "tokens_per_s": round(tok_s, 1),
                "eta_s": round(eta, 1) if eta is not None else None,
                "phase": "train",
            }
            stages.update_progress(self.db, self.stage_id, prog)
            emit("progress", stage_id=self.stage_id, **prog)
        if line_due:
            self._last_line = now
            say(
                f"stage {self.stage_id}: step {step}/{total} loss {loss:.3f} lr {lr:.1e}"
                f" {tok_s:.0f} tok/s ETA {duration(eta)}"
            )

    def holdout(
        self, step: int, total: int, loss: float, *, best: float, bad: int, patience: int
    ) -> None:
        """One early-stopping evaluation on the holdout (the step's own line follows it)."""
        emit("holdout", stage_id=self.stage_id, step=step, loss=loss)
        self._last_line = -math.inf  # every evaluation step gets its progress line
        trend = "new best" if bad == 0 else f"best {best:.3f}, {bad}/{patience} without gain"
        say(f"stage {self.stage_id}: step {step}/{total} holdout loss {loss:.3f} ({trend})")

    def phase(self, phase: str, message: str, **fields: Any) -> None:
        """A phase change (evaluate, publish, stopped, ...) on every channel."""
        stages.update_progress(self.db, self.stage_id, {"phase": phase, **fields})
        emit("progress", stage_id=self.stage_id, phase=phase, **fields)
        say(f"stage {self.stage_id}: {message}")


class QuietReporter(Reporter):
    """The reporter of ranks other than 0 under torchrun: rank 0 speaks for the stage."""

    def start(self, step: int, tokens: int, total: int) -> None:
        return None

    def step(self, step: int, total: int, *, loss: float, lr: float, tokens: int) -> None:
        return None

    def holdout(
        self, step: int, total: int, loss: float, *, best: float, bad: int, patience: int
    ) -> None:
        return None

    def phase(self, phase: str, message: str, **fields: Any) -> None:
        return None
