"""Glue between the store and the policies: explain the next decision, plan a stage, gate,
and decide what happens to a rejected stage's data.

The daemon calls these; none of them imports torch. Anything that needs a model (losses
for ``surprise``, ``most_forgotten`` and ``highest_loss``) is read from ``chunk_scores``,
which the scorer subprocess fills; missing scores degrade to documented fallbacks and the
reasons say so.

Event policy: :func:`explain_next` runs every scheduler tick (30 s by default) and after
each ingest. It writes a ``policy.decision`` event only when the decision's *signature*
changes: the verdict plus which leaves fire (and whether a stage is running / nothing is
pending). Numbers inside the reasons ("now 12,400 tokens") change on every ingest and do
not count, so the events table gets one row per real change, not one per tick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, tzinfo
from typing import Any

import sqlite_utils

from daemon.config import Config
from policies import probes
from policies.base import Decision, ReplayCandidate, TriggerState
from policies.selection import PendingChunk
from policies.spec import build_all
from policies.triggers import uses
from policies.units import fmt_clock, fmt_int
from store import adapters, documents, events, kv, stages
from store.db import transaction

log = logging.getLogger(__name__)

# A pause between two recorded ticks longer than this counts as downtime (catch-up windows).
GAP_MIN_S = 90.0
GAP_INTERVALS = 3.0
EVENT_KIND = "policy.decision"
REJECT_EVENT_KIND = "policy.rejected_data"


def _local_tz() -> tzinfo:
    """The daemon's zone: cron windows and clock times in reasons read as local time."""
    tz = datetime.now().astimezone().tzinfo
    assert tz is not None
    return tz


@contextmanager
def _tx(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction, or the caller's if it already holds one (so the runner may
    call :func:`after_reject` inside its own transaction)."""
    if db.conn.in_transaction:
        yield
        return
    with transaction(db):
        yield


def _kv_key(name: str, track: str) -> str:
    return f"policy.{name}:{track}"


def _mean_loss(
    rows: list[dict[str, Any]], scores: dict[int, float], id_key: str = "id"
) -> tuple[float | None, float]:
    """Token-weighted mean loss over scored rows, and the scored share of tokens."""
    total = sum(max(0, int(r["n_tokens"])) for r in rows)
    num = 0.0
    weight = 0
    for r in rows:
        loss = scores.get(int(r[id_key]))
        if loss is None or not math.isfinite(loss):
            continue
        n = max(1, int(r["n_tokens"]))
        num += loss * n
        weight += n
    if not weight:
        return None, 0.0
    return num / weight, (weight / total if total else 1.0)


def _last_stage_at(db: sqlite_utils.Database, track: str) -> float | None:
    last = stages.latest(db, track)
    if not last:
        return None
    times = [last.get(k) for k in ("created_at", "started_at", "finished_at")]
    return max(float(t) for t in times if t is not None)


def build_state(
    cfg: Config,
    db: sqlite_utils.Database,
    *,
    now: float,
    tz: tzinfo | None = None,
    need_scores: bool = True,
    fetch_serving: Callable[[list[str]], dict[str, float | None]] | None = None,
    probe_memory: Callable[[], int] | None = None,
    probe: bool = True,
) -> TriggerState:
    """Snapshot the store (and, if the tree needs them, vLLM load and free memory)."""
    track = cfg.track
    current = adapters.current(db, track)
    state = TriggerState(
        now=now,
        pending_tokens=documents.pending_tokens(db, track),
        oldest_pending_at=documents.oldest_pending_train_at(db, track),
        last_stage_at=_last_stage_at(db, track),
        stage_running=bool(stages.active(db, track)),
        tz=tz or _local_tz(),
    )
    if need_scores:
        pending = documents.pending_chunk_facts(db, track, split="train")
        state.pending_loss, state.pending_scored_fraction = _mean_loss(
            pending, documents.scores(db, current, [int(r["id"]) for r in pending])
        )
        learned = documents.learned_holdout(db, track)
        state.learned_holdout_chunks = len(learned)
        state.learned_holdout_loss, _ = _mean_loss(
            learned, documents.scores(db, current, [int(r["id"]) for r in learned])
        )
    gap = kv.get(db, _kv_key("last_gap", track))
    if gap:
        start, end = json.loads(gap)
        state.last_gap = (float(start), float(end))
    tree = cfg.policy.trigger
    if probe and uses(tree, "serving_load"):
        fetch = fetch_serving or (
            lambda eps: probes.fetch_running(eps, api_key=cfg.serving.api_key)
        )
        state.serving_running = fetch(probes.serving_endpoints(cfg))
    if probe and uses(tree, "resources"):
        state.free_memory_bytes = (probe_memory or probes.free_memory)()
    state.extra["current_adapter"] = current
    return state


def _record_tick(cfg: Config, db: sqlite_utils.Database, now: float) -> None:
    """Remember this tick; a long silence since the last one is recorded as downtime."""
    key = _kv_key("last_tick", cfg.track)
    prev = kv.get(db, key)
    if prev is not None:
        prev_t = float(prev)
        if now - prev_t > max(GAP_MIN_S, GAP_INTERVALS * cfg.policy.interval_s):
            kv.put(db, _kv_key("last_gap", cfg.track), json.dumps([prev_t, now]))
    if prev is None or now > float(prev):
        kv.put(db, key, repr(now))


def _signature(fire: bool, blocked: str, decision: Decision) -> str:
    leaves = [(leaf["policy"], leaf["fire"]) for leaf in decision.data.get("leaves", [])]
    raw = json.dumps([fire, blocked, leaves])
    return hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()[:16]


def explain_next(
    cfg: Config,
    db: sqlite_utils.Database,
    *,
    now: float | None = None,
    record: bool = True,
    tz: tzinfo | None = None,
    fetch_serving: Callable[[list[str]], dict[str, float | None]] | None = None,
    probe_memory: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Evaluate the trigger policy without acting: would a stage start now, and why?

    Returns ``fire``, ``reasons`` (one sentence per leaf), ``summary`` (one line: "train
    now: ..." or "next stage when ..."), ``due_at`` (a time estimate when the wait is only
    time-based), ``checks`` (each leaf's verdict) and ``state`` (the numbers it saw).

    ``record=True`` (the daemon's tick) remembers the tick for downtime detection and
    writes a ``policy.decision`` event when the decision changed; ``evergreen status``
    passes ``record=False`` so looking never writes.
    """
    now = time.time() if now is None else now
    pol = build_all(cfg)
    if record:
        with _tx(db):
            _record_tick(cfg, db, now)
    state = build_state(
        cfg,
        db,
        now=now,
        tz=tz,
        need_scores=uses(cfg.policy.trigger, "surprise"),
        fetch_serving=fetch_serving,
        probe_memory=probe_memory,
    )
    decision = pol.trigger.evaluate(state)
    blocked = _blocked(cfg, db, state)
    fire = decision.fire and not blocked
    due_at = decision.data.get("due_at") if not fire and not blocked else None
    due_at = due_at if due_at is not None and due_at > now else None
    reasons = ([blocked] if blocked else []) + decision.reasons
    result: dict[str, Any] = {
        "fire": fire,
        "reasons": reasons,
        "summary": _summary_line(decision, state, blocked=blocked, fire=fire, due_at=due_at),
        "due_at": due_at,
        "checks": decision.data.get("leaves", []),
        "evaluated_at": now,
        "state": _state_view(state),
    }
    if record:
        _record_decision(cfg, db, result, decision, state=state, blocked=blocked)
    return result


def _blocked(cfg: Config, db: sqlite_utils.Database, state: TriggerState) -> str:
    """Why no stage can start whatever the trigger tree says ('' = nothing blocks)."""
    if state.stage_running:
        active = stages.active(db, cfg.track)[0]
        return f"stage #{active['id']} is {active['status']}; at most one stage at a time"
    if state.pending_tokens <= 0:
        return "nothing pending to train"
    return ""


def _summary_line(
    decision: Decision, state: TriggerState, *, blocked: str, fire: bool, due_at: float | None
) -> str:
    """'train now: ...', 'next stage when ...' or the blocking reason, as one line."""
    summary = decision.summary
    if not decision.fire and not decision.data.get("combinator") and decision.data.get("when"):
        summary = str(decision.data["when"])  # a lone leaf: its "next stage when" phrase
    if blocked:
        return blocked + (f" (then: {summary})" if summary else "")
    if fire:
        return f"train now: {summary}"
    line = f"next stage when {summary}"
    if due_at is not None:
        hhmm = datetime.fromtimestamp(due_at, state.tz).strftime("%H:%M")
        if hhmm not in line:  # "at 14:00 (staleness 6h)" already says it
            line += f" (earliest {fmt_clock(due_at, state.tz, state.now)})"
    return line


def _state_view(state: TriggerState) -> dict[str, Any]:
    """The numbers the decision saw, for status and ``--json``."""
    return {
        "pending_tokens": state.pending_tokens,
        "staleness_s": round(state.now - state.oldest_pending_at, 1)
        if state.oldest_pending_at
        else 0.0,
        "last_stage_at": state.last_stage_at,
        "stage_running": state.stage_running,
        "current_adapter": state.extra.get("current_adapter"),
        "pending_loss": state.pending_loss,
        "pending_scored_fraction": round(state.pending_scored_fraction, 3),
        "learned_holdout_loss": state.learned_holdout_loss,
        "serving_running": state.serving_running,
        "free_memory_bytes": state.free_memory_bytes,
    }


def _record_decision(
    cfg: Config,
    db: sqlite_utils.Database,
    result: dict[str, Any],
    decision: Decision,
    *,
    state: TriggerState,
    blocked: str,
) -> None:
    """One ``policy.decision`` event (and log line) per change of the decision."""
    # the blocking *kind* counts, not its text: a stage moving running -> evaluated is
    # not a new decision (those transitions are stage events already)
    kind = "running" if state.stage_running else ("empty" if blocked else "")
    sig = _signature(result["fire"], kind, decision)
    key = _kv_key("decision_sig", cfg.track)
    with _tx(db):
        if kv.get(db, key) == sig:
            return
        kv.put(db, key, sig)
        events.record(
            db,
            EVENT_KIND,
            result["summary"],
            track=cfg.track,
            data={"fire": result["fire"], "reasons": result["reasons"], "checks": result["checks"]},
        )
    result["recorded"] = True
    log.info("policy decision: %s", result["summary"])


def plan_stage(
    cfg: Config, db: sqlite_utils.Database, *, rng: random.Random | None = None
) -> dict[str, Any] | None:
    """Choose the new and replay chunks for the next stage; None when nothing is pending.

    New data: the selection policy under its token budget (highest loss first). Replay:
    the replay policy at ``ratio × new tokens``. Holdout: the pending holdout chunks of
    the documents selected. Returns ``new_chunk_ids``, ``replay_chunk_ids``,
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
    candidates = [c for c in replay_candidates(db, track, current) if c.chunk_id not in chosen]
    budget = pol.replay.budget(sel.tokens)
    rep = pol.replay.plan(candidates, budget, rng)
    return {
        "new_chunk_ids": sel.chunk_ids,
        "replay_chunk_ids": rep.chunk_ids,
        "holdout_chunk_ids": holdout,
        "reasons": sel.reasons + rep.reasons,
        "parent_version": current,
        "new_tokens": sel.tokens,
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


def gate(cfg: Config, candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Promotion gate: ``{"fire": promote?, "reasons": [...], "failed": [...], "summary"}``."""
    decision = build_all(cfg).promotion.decide(candidate, baseline)
    return {
        "fire": decision.fire,
        "reasons": decision.reasons,
        "failed": decision.data.get("failed", []),
        "summary": decision.summary,
    }


def after_reject(
    cfg: Config, db: sqlite_utils.Database, stage: dict[str, Any] | int
) -> dict[str, Any]:
    """What happens to a rejected stage's new data (call once per rejected stage).

    Nothing is deleted. Each still-pending new chunk gets one more ``attempts``; with
    ``policy.on_reject = "retry"`` it stays pending (a later stage retries it) until it
    has been rejected more than ``policy.max_retries`` times, then it is set aside
    (status ``dropped``); with ``"drop"`` it is set aside at once. Replay chunks are old,
    already-learned data and are untouched. Returns the ids retried and set aside.
    """
    row = stages.get(db, stage) if isinstance(stage, int) else stage
    if row is None:
        raise KeyError(f"no stage {stage!r}")
    plan = row.get("plan") or {}
    if isinstance(plan, str):
        plan = json.loads(plan or "{}")
    new_ids = [int(i) for i in plan.get("new_chunk_ids", [])]
    pc = cfg.policy
    with _tx(db):
        attempts = documents.bump_attempts(db, new_ids)
        if pc.on_reject == "drop":
            aside = sorted(attempts)
        else:
            aside = sorted(cid for cid, n in attempts.items() if n > pc.max_retries)
        documents.set_aside(db, aside)
        retry = sorted(set(attempts) - set(aside))
        why = (
            "policy.on_reject = drop"
            if pc.on_reject == "drop"
            else f"after more than {pc.max_retries} rejected attempts"
        )
        message = (
            f"stage {row['id']} rejected: {fmt_int(len(retry))} new chunks stay pending for"
            f" retry, {fmt_int(len(aside))} set aside ({why})"
        )
        events.record(
            db,
            REJECT_EVENT_KIND,
            message,
            subject=str(row["id"]),
            track=str(row.get("track") or cfg.track),
            data={"retry": len(retry), "set_aside": aside[:1000]},
        )
    return {"retry": retry, "set_aside": aside, "message": message}


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
