"""Planning a stage from the store and the policies, the promotion gate, and what
happens to a rejected stage's data; plus which chunks the scorer should score next.

Nothing here imports torch: losses are read from ``chunk_scores`` (the scorer
subprocess fills them) and missing scores degrade to the policies' documented fallbacks.
"""

from __future__ import annotations

import json
import random
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.scheduling import retry as retry_mod
from daemon.scheduling.spec import build_all
from policies.base import ReplayCandidate
from policies.selection import PendingChunk
from policies.trigger_tree import uses
from policies.units import fmt_int
from store import adapters, documents, events, stages, synthetic
from store.contracts import GateVerdict
from store.db import savepoint

REJECT_EVENT_KIND = "policy.rejected_data"


def plan_stage(
    cfg: Config, db: sqlite_utils.Database, *, rng: random.Random | None = None
) -> dict[str, Any] | None:
    """Choose the new and replay chunks for the next stage; None when nothing is pending.

    New data: the selection policy under its token budget (highest loss first).
    Synthetic: the live synthetic study text of the selected chunks (trained, never
    evaluated). Replay: the replay policy at ``ratio × new tokens`` (user tokens only),
    twice that per retention regression of a retry (:mod:`daemon.scheduling.retry`).
    Holdout: the pending holdout chunks of the documents selected. Returns
    ``new_chunk_ids``, ``synthetic_chunk_ids``, ``replay_chunk_ids``,
    ``holdout_chunk_ids``, ``reasons``, ``parent_version`` and the token counts.
    """
    rng = rng or random.Random(cfg.training.seed)
    track = cfg.track
    pol = build_all(cfg)
    current = adapters.current(db, track)
    pending = documents.pending_chunk_facts(db, track, split="train")
    if not pending:
        return None
    sel = pol.selection.plan(_pending_candidates(db, current, pending), rng)
    chosen = set(sel.chunk_ids)
    docs = {int(c["document_id"]) for c in pending if int(c["id"]) in chosen}
    holdout = [
        int(c["id"])
        for c in documents.pending_chunk_facts(db, track, split="holdout")
        if int(c["document_id"]) in docs
    ]
    syn_ids, syn_tokens = synthetic.ids_and_tokens(db, sel.chunk_ids)
    never = chosen | set(syn_ids)
    candidates = [c for c in replay_candidates(db, track, current) if c.chunk_id not in never]
    factor = retry_mod.adjustment(cfg, db, sel.chunk_ids).replay_factor
    budget = int(pol.replay.budget(sel.tokens) * factor)
    rep = pol.replay.plan(candidates, budget, rng)
    syn_why = [
        f"synthetic: {fmt_int(len(syn_ids))} texts ({fmt_int(syn_tokens)} tokens) of the"
        " selected chunks, trained with them, never evaluated"
    ][: 1 if syn_ids else 0]
    return {
        "new_chunk_ids": sel.chunk_ids,
        "synthetic_chunk_ids": syn_ids,
        "replay_chunk_ids": rep.chunk_ids,
        "holdout_chunk_ids": holdout,
        "reasons": [*sel.reasons, *syn_why, *rep.reasons],
        "parent_version": current,
        "new_tokens": sel.tokens,
        "synthetic_tokens": syn_tokens,
        "replay_tokens": rep.tokens,
        "replay_budget_tokens": budget,
        "selection_policy": str(getattr(pol.selection, "policy_name", "")),
        "replay_policy": str(getattr(pol.replay, "policy_name", "")),
    }


def _pending_candidates(
    db: sqlite_utils.Database, current: str | None, pending: list[dict[str, Any]]
) -> list[PendingChunk]:
    loss = documents.scores(db, current, [int(c["id"]) for c in pending])
    return [
        PendingChunk(
            chunk_id=int(c["id"]),
            n_tokens=int(c["n_tokens"]),
            created_at=float(c["created_at"]),
            loss=loss.get(int(c["id"])),
            attempts=int(c.get("attempts") or 0),
        )
        for c in pending
    ]


def replay_candidates(
    db: sqlite_utils.Database, track: str, current: str | None
) -> list[ReplayCandidate]:
    """The replay buffer as policy candidates, with losses learned and under ``current``."""
    rows = documents.replay_rows(db, track)
    current_loss = documents.scores(db, current, [int(r["chunk_id"]) for r in rows])
    return [
        ReplayCandidate(
            chunk_id=int(r["chunk_id"]),
            n_tokens=int(r["n_tokens"]),
            stage_id=r["stage_id"],
            added_at=float(r["added_at"]),
            source=str(r.get("path") or r.get("document_id")),
            learned_loss=r.get("learned_loss"),
            current_loss=current_loss.get(int(r["chunk_id"])),
        )
        for r in rows
    ]


def gate(cfg: Config, candidate: dict[str, Any], baseline: dict[str, Any]) -> GateVerdict:
    """The configured promotion policy's verdict on a candidate's metrics vs the baseline's."""
    return retry_mod.judge(cfg, candidate, baseline)


def after_reject(
    cfg: Config, db: sqlite_utils.Database, stage: dict[str, Any] | int
) -> dict[str, Any]:
    """What happens to a rejected stage's new data (call once per rejected stage).

    Nothing is deleted. Each still-pending new chunk gets one more ``attempts``; with
    ``policy.on_reject = "retry"`` it stays pending (a later stage retries it with a
    recipe adapted to this verdict, :mod:`daemon.scheduling.retry`) until it has been
    rejected more than ``policy.max_retries`` times, then it is set aside (status
    ``dropped``) with what the retries tried in the message; with ``"drop"`` it is set
    aside at once. Replay and synthetic chunks are untouched. The gate's verdict is
    stored in the stage's metrics (``gate``) for the retry to read. Returns the ids
    retried and set aside.
    """
    row = stages.get(db, stage) if isinstance(stage, int) else stage
    if row is None:
        raise KeyError(f"no stage {stage!r}")
    plan = row.get("plan") or {}
    if isinstance(plan, str):
        plan = json.loads(plan or "{}")
    new_ids = [int(i) for i in plan.get("new_chunk_ids", [])]
    pc = cfg.policy
    with savepoint(db, "scheduling"):
        verdict = retry_mod.verdict_of(cfg, row)
        stages.merge_metrics(db, int(row["id"]), {"gate": verdict.to_dict()})
        attempts = documents.bump_attempts(db, new_ids)
        if pc.on_reject == "drop":
            aside = sorted(attempts)
        else:
            aside = sorted(cid for cid, n in attempts.items() if n > pc.max_retries)
        documents.set_aside(db, aside)
        retry = sorted(set(attempts) - set(aside))
        history = retry_mod.rejections(cfg, db, new_ids)
        message = _reject_message(cfg, int(row["id"]), retry, aside, history)
        events.record(
            db,
            REJECT_EVENT_KIND,
            message,
            subject=str(row["id"]),
            track=str(row.get("track") or cfg.track),
            data={
                "retry": len(retry),
                "set_aside": aside[:1000],
                "causes": [r.causes for r in history],
                "failed": verdict.failed,
            },
        )
    return {"retry": retry, "set_aside": aside, "message": message}


def _reject_message(
    cfg: Config,
    stage_id: int,
    retry: list[int],
    aside: list[int],
    history: list[retry_mod.Rejection],
) -> str:
    """``stage 7 rejected: 0 new chunks stay pending for retry, 2 set aside (...): ...``."""
    pc = cfg.policy
    why = (
        "policy.on_reject = drop"
        if pc.on_reject == "drop"
        else f"after more than {pc.max_retries} rejected attempts"
    )
    text = (
        f"stage {stage_id} rejected: {fmt_int(len(retry))} new chunks stay pending for"
        f" retry, {fmt_int(len(aside))} set aside ({why})"
    )
    last = history[-1] if history and history[-1].stage_id == stage_id else None
    if last is None:
        return text
    adapted = [r for r in history if r.retry]
    if aside and pc.on_reject == "retry":
        tried = adapted[-1].retry.get("tried", "") if adapted else ""
        return (
            f"{text}: set aside after {len(adapted)} adapted retries:"
            f" {retry_mod.summary(history)}" + (f" (last tried {tried})" if tried else "")
        )
    return f"{text}; rejected for {', '.join(last.labels) or last.phrase()}"


def scoring_needs(cfg: Config, db: sqlite_utils.Database, *, limit: int = 5000) -> dict[str, Any]:
    """Which chunks the scorer subprocess should score next, for the configured policies.

    Returns ``adapter_version`` (the current one; '' = base model) and ``chunk_ids`` not
    yet scored under it, most useful first: pending train chunks (``highest_loss``
    selection and ``surprise``), holdout of learned documents (``surprise``), replay
    buffer chunks (``most_forgotten``). Empty when no configured policy reads scores, so
    a deployment that does not use them never pays for a scorer run.
    """
    track = cfg.track
    current = adapters.current(db, track)
    pol = build_all(cfg)
    surprise = uses(cfg.policy.trigger, "surprise")
    wanted: list[tuple[str, list[int]]] = []
    if surprise or getattr(pol.selection, "policy_name", "") == "highest_loss":
        wanted.append(("pending", [int(c["id"]) for c in documents.pending_chunk_facts(db, track)]))
    if surprise:
        wanted.append(
            ("learned holdout", [int(r["id"]) for r in documents.learned_holdout(db, track)])
        )
    if getattr(pol.replay, "policy_name", "") == "most_forgotten":
        wanted.append(("replay", [int(r["chunk_id"]) for r in documents.replay_rows(db, track)]))
    out: list[int] = []
    reasons: list[str] = []
    seen: set[int] = set()
    for label, ids in wanted:
        have = documents.scores(db, current, ids)
        missing = [i for i in ids if i not in have and i not in seen]
        seen.update(missing)
        reasons.append(f"{label}: {len(missing)} of {len(ids)} chunks unscored")
        out.extend(missing)
    return {"adapter_version": current or "", "chunk_ids": out[:limit], "reasons": reasons}
