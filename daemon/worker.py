"""The stage worker: the one thread that scores new data and runs stages.

On a poke (after an ingest batch, from the scheduler, after a promotion) it scores a
bounded batch of new data if a configured policy reads scores, then evaluates the trigger
policy and, when it fires, runs one stage (plan -> subprocess -> eval -> gate -> promote).
Both on this one thread: one stage at a time by construction, and the scorer never runs
while a stage does.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import sqlite_utils

from daemon.augment import augment_pending
from daemon.scheduling.decisions import explain_next
from daemon.training.runner import resume_or_fail_running, run_stage
from daemon.training.scoring import Scorer
from daemon.training.spawn import warm_trainer
from daemon.training.warm import WarmTrainer
from store.db import open_db

if TYPE_CHECKING:
    from daemon.service import Service

log = logging.getLogger("evergreen.service")


class StageWorker(threading.Thread):
    """Runs at most one stage at a time, when the trigger policy fires.

    Between stages it also runs the scorer (:class:`Scorer`) on new data, so the trigger
    and the selection see its loss before a stage trains on it; both happen on this one
    thread, so the scorer never runs while a stage does.
    """

    def __init__(self, service: Service) -> None:
        super().__init__(name="stage-worker", daemon=True)
        self.service = service
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.busy = threading.Event()

    def poke(self) -> None:
        self.wake.set()

    def run(self) -> None:
        cfg = self.service.cfg
        db = open_db(cfg.db_path)
        warm = warm_trainer(cfg) if cfg.training.prewarm else None
        scorer = Scorer(cfg)
        try:
            self._resume(db)
            while not self.stop_event.is_set():
                if warm is not None:
                    warm.prewarm()  # after the previous stage's swap: it does not slow it
                self.wake.wait()
                self.wake.clear()
                if self.stop_event.is_set():
                    break
                self._augment(db)
                self._score(db, scorer)
                if not self.stop_event.is_set():
                    self._maybe_train(db, warm)
        finally:
            if warm is not None:
                warm.close()
            db.conn.close()

    def _resume(self, db: sqlite_utils.Database) -> None:
        """Finish the stages a previous daemon left active (before anything new)."""
        self.busy.set()
        try:
            for result in resume_or_fail_running(
                self.service.cfg,
                db,
                promote=self.service.promote,
                on_progress=self.service.on_progress,
                stop_event=self.stop_event,
            ):
                self.service.on_stage_finished(db, result)
        except Exception:
            log.exception("resuming interrupted stages failed")
        finally:
            self.busy.clear()

    def _augment(self, db: sqlite_utils.Database) -> None:
        """Write synthetic study text for new chunks (``[augment]``) before they train."""
        try:
            augment_pending(self.service.cfg, db, should_stop=self.stop_event.is_set)
        except Exception:
            log.exception("augmentation failed")

    def _score(self, db: sqlite_utils.Database, scorer: Scorer) -> None:
        """Score a bounded batch of new data if a configured policy reads scores."""
        try:
            run = scorer.run(db, stop_event=self.stop_event)
        except Exception:
            log.exception("scoring failed")
            return
        if run is not None and run.more:
            self.poke()  # the rest on the next turn, after the trigger has had its say

    def _maybe_train(self, db: sqlite_utils.Database, warm: WarmTrainer | None) -> None:
        cfg = self.service.cfg
        try:
            decision = explain_next(cfg, db)
        except Exception:
            log.exception("trigger evaluation failed")
            return
        if not decision.get("fire"):
            return
        log.info("stage triggered: %s", "; ".join(decision.get("reasons", [])))
        self.busy.set()
        self.service.metrics.stage_running.set(1)
        try:
            result = run_stage(
                cfg,
                db,
                promote=self.service.promote,
                on_progress=self.service.on_progress,
                stop_event=self.stop_event,
                warm=warm,
            )
            self.service.on_stage_finished(db, result)
            if result.status == "promoted":
                self.poke()  # more data may have arrived meanwhile
        except Exception:
            log.exception("stage run failed")
        finally:
            self.busy.clear()
            self.service.metrics.stage_running.set(0)
