"""``evergreen train --now``: one stage in the foreground, with a rich progress bar."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.training.finish import PromoteFn
from daemon.training.runner import resume_or_fail_running, run_stage
from store.contracts import StageResult
from store.db import open_db


def train_now(cfg: Config, *, promote: PromoteFn, progress: bool = True) -> StageResult:
    """Plan and run one stage now, whatever the trigger says; ``promote`` is serving's
    promotion (the CLI passes one that swaps, or only moves the pointer with ``--no-swap``)."""
    if not cfg.base_model:
        from daemon.training.seed import ensure_seed_model

        ensure_seed_model(cfg, progress=progress)
    db = open_db(cfg.db_path)
    try:
        if not progress:
            return _resume_or_run(cfg, db, promote, None)
        with ProgressBar() as bar:
            return _resume_or_run(cfg, db, promote, bar.update)
    finally:
        db.conn.close()


def _resume_or_run(
    cfg: Config, db: sqlite_utils.Database, promote: PromoteFn, on_progress: Any
) -> StageResult:
    """A stage a stopped daemon left unfinished is finished first (as the daemon would on
    start): planning a new one would train its chunks twice, once in each stage."""
    resumed = resume_or_fail_running(cfg, db, promote=promote, on_progress=on_progress)
    if resumed:
        return resumed[-1]
    return run_stage(cfg, db, promote=promote, on_progress=on_progress)


class ProgressBar:
    """rich bar fed by the stage's JSON progress lines."""

    def __enter__(self) -> ProgressBar:
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
