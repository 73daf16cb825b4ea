"""Glue between the store and the policies: plan a stage, explain the next decision, gate.

SKELETON: the policies work (issue 5) replaces the simple logic here with the configured
trigger tree, replay policy, selection and gate. The function signatures are the contract.
"""

from __future__ import annotations

import random
import time
from typing import Any

import sqlite_utils

from daemon.config import Config
from store import adapters, documents, stages


def explain_next(
    cfg: Config, db: sqlite_utils.Database, *, now: float | None = None
) -> dict[str, Any]:
    """Evaluate the trigger policy (without acting): {"fire": bool, "reasons": [...]}."""
    now = time.time() if now is None else now
    pending = documents.pending_tokens(db, cfg.track)
    fire = pending > 0 and not stages.active(db, cfg.track)
    return {"fire": fire, "reasons": [f"{pending} pending tokens"]}


def plan_stage(
    cfg: Config, db: sqlite_utils.Database, *, rng: random.Random | None = None
) -> dict[str, Any] | None:
    """Choose the new and replay chunks for the next stage; None when nothing is pending.

    Returns the plan's data-selection part: ``new_chunk_ids``, ``replay_chunk_ids``,
    ``holdout_chunk_ids`` (pending holdout of the same documents) and ``reasons``.
    """
    rng = rng or random.Random(cfg.training.seed)
    new = documents.pending_chunks(db, cfg.track, split="train")
    if not new:
        return None
    holdout = documents.pending_chunks(db, cfg.track, split="holdout")
    new_tokens = sum(c["n_tokens"] for c in new)
    ratio = float(cfg.policy.replay.get("ratio", 0.5))
    budget = int(new_tokens * ratio)
    pool = documents.replay_rows(db, cfg.track)
    rng.shuffle(pool)
    replay: list[int] = []
    used = 0
    for row in pool:
        if used >= budget:
            break
        replay.append(int(row["chunk_id"]))
        used += int(row["n_tokens"])
    return {
        "new_chunk_ids": [int(c["id"]) for c in new],
        "replay_chunk_ids": replay,
        "holdout_chunk_ids": [int(c["id"]) for c in holdout],
        "reasons": [f"{len(new)} new chunks ({new_tokens} tokens), {len(replay)} replay chunks"],
        "parent_version": adapters.current(db, cfg.track),
    }


def gate(cfg: Config, candidate: dict[str, float], baseline: dict[str, float]) -> dict[str, Any]:
    """Promotion gate: {"fire": promote?, "reasons": [...]}."""
    new_ok = candidate.get("new_loss", float("inf")) < baseline.get("new_loss", float("inf"))
    return {
        "fire": new_ok,
        "reasons": ["new loss improved" if new_ok else "new loss did not improve"],
    }
