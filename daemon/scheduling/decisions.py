"""Glue between the store and the trigger policy: snapshot the store, explain the next
decision, and record decisions and downtime (planning a stage is :mod:`.planning`).

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
import time
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.scheduling import probes
from daemon.scheduling.spec import build_all
from policies.base import Decision, TriggerState
from policies.trigger_tree import uses
from policies.units import fmt_clock
from store import adapters, documents, events, kv, stages
from store.db import savepoint

log = logging.getLogger(__name__)

# A pause between two recorded ticks longer than this counts as downtime (catch-up windows).
GAP_MIN_S = 90.0
GAP_INTERVALS = 3.0
EVENT_KIND = "policy.decision"


def _local_tz() -> tzinfo:
    """The daemon's zone: cron windows and clock times in reasons read as local time."""
    tz = datetime.now().astimezone().tzinfo
    assert tz is not None
    return tz


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
        with savepoint(db, "scheduling"):
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
    with savepoint(db, "scheduling"):
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
