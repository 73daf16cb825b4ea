"""A stage's evaluation: the candidate against its parent, and per-chunk losses.

Which sets a stage is judged on is decided here (new holdout, retention, general anchor,
user eval sets); how a loss or an eval point is measured lives in
:mod:`daemon.training.evaluate`, shared with the scorer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.config import TrainingConfig
from daemon.training import evaluate as ev
from daemon.training.data import Example
from daemon.training.lora import Loaded
from daemon.training.stage_data import StageData, as_eval, encode_ids
from store.contracts import StagePlan


def evaluate(
    db: sqlite_utils.Database,
    plan: StagePlan,
    loaded: Loaded,
    data: StageData,
    hp: TrainingConfig,
) -> tuple[dict[str, Any], dict[int, float]]:
    """``({"candidate": {...}, "baseline": {...}}, {chunk_id: loss under the candidate})``."""
    sets = loss_sets(plan, loaded.tok, data, hp.max_seq_len)
    evals = {Path(p).stem: ev.load_eval_set(Path(p)) for p in plan.eval_sets}
    metrics: dict[str, Any] = ev.evaluate_both(
        loaded.model,
        loaded.tok,
        parent_path=plan.parent_path or None,
        sets=sets,
        evals=evals,
        max_len=hp.max_seq_len,
        batch_tokens=hp.batch_tokens,
        device=loaded.dev.device,
        match_mode=plan.eval_match,
    )
    metrics["candidate"]["new_loss_on"] = 0.0 if data.holdout else 1.0  # 1 = train data
    return metrics, chunk_losses(db, plan, loaded, data, hp)


def loss_sets(plan: StagePlan, tok: Any, data: StageData, max_len: int) -> dict[str, list[Example]]:
    """The loss sets: new-data holdout (the train chunks when there is none), retention,
    and the general anchor text when the plan names one."""
    sets = {"new_loss": data.holdout or as_eval(data.new), "retention_loss": data.retention}
    if plan.general_eval:
        sets["general_loss"] = ev.general_examples(tok, Path(plan.general_eval), max_len)
    return sets


def chunk_losses(
    db: sqlite_utils.Database,
    plan: StagePlan,
    loaded: Loaded,
    data: StageData,
    hp: TrainingConfig,
) -> dict[int, float]:
    """Per-chunk losses under the candidate of what the stage trained, plus the plan's
    ``score_chunk_ids``: the runner records them as learned losses on promotion, and
    replay/selection policies read them."""
    examples = as_eval(data.new + data.replay)
    examples += encode_ids(db, loaded.tok, plan.score_chunk_ids, "eval", hp.max_seq_len, warn=False)
    _, per_chunk, _ = ev.example_losses(
        loaded.model,
        examples,
        max_len=hp.max_seq_len,
        batch_tokens=hp.batch_tokens,
        device=loaded.dev.device,
    )
    return per_chunk
