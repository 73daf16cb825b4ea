"""Trigger policies: when to start a training stage.

Each leaf is a small parameter model with ``evaluate(state) -> Decision``; ``all``/``any``
combine them as the config tree says (:mod:`policies.trigger_tree`; the ``window`` leaf
lives in :mod:`policies.window`). Every decision explains itself twice:

* ``reasons``: one self-contained sentence per leaf (written to the events table);
* ``data["when"]`` / ``summary``: the condition phrased for "next stage when ...", so the
  whole tree reads as one line, e.g. ``next stage when ≥ 20,000 new tokens (now 12,400)
  or at 02:00 (staleness 6h), cooldown ends 14:05``.

Time-based leaves also give ``data["due_at"]``: the moment they become true if nothing
else changes, which the combinators fold into an estimate of the next stage.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from policies.base import Decision, TriggerState, register
from policies.params import Params
from policies.trigger_tree import (
    DEFAULT_TREE,
    AllOf,
    AnyOf,
    build_trigger,
    leaf,
    normalize_tree,
    uses,
)
from policies.units import (
    Bytes,
    Fraction,
    NonNegInt,
    PositiveDuration,
    PositiveFloat,
    PositiveInt,
    fmt_bytes,
    fmt_clock,
    fmt_duration,
    fmt_int,
    fmt_when,
)
from policies.window import Window


@register("trigger", "min_new_tokens")
class MinNewTokens(Params):
    """Fire once at least ``n`` new (pending, train split) tokens are waiting."""

    n: PositiveInt = Field(description="Pending train tokens needed to start a stage.")

    def evaluate(self, state: TriggerState) -> Decision:
        fire = state.pending_tokens >= self.n
        cond = f"≥ {fmt_int(self.n)} new tokens (now {fmt_int(state.pending_tokens)})"
        reason = (
            f"{fmt_int(state.pending_tokens)} new tokens pending, ≥ {fmt_int(self.n)}"
            if fire
            else f"waiting for ≥ {fmt_int(self.n)} new tokens (now {fmt_int(state.pending_tokens)})"
        )
        return leaf("min_new_tokens", fire, reason, cond)


@register("trigger", "max_staleness")
class MaxStaleness(Params):
    """Train anyway once the oldest pending data is this old (bounds model staleness)."""

    duration: PositiveDuration = Field(description="Maximum age of pending data, e.g. '6h'.")

    def evaluate(self, state: TriggerState) -> Decision:
        limit = fmt_duration(self.duration)
        if state.oldest_pending_at is None:
            return leaf(
                "max_staleness",
                False,
                f"nothing pending, so nothing is stale (max staleness {limit})",
                f"data is {limit} old",
            )
        age = state.now - state.oldest_pending_at
        due = state.oldest_pending_at + self.duration
        if age >= self.duration:
            return leaf(
                "max_staleness",
                True,
                f"oldest pending data is {fmt_duration(age)} old (max staleness {limit})",
                f"data is {limit} old",
                due_at=due,
            )
        return leaf(
            "max_staleness",
            False,
            f"oldest pending data is {fmt_duration(age)} old; staleness limit {limit} at"
            f" {fmt_clock(due, state.tz, state.now)}",
            f"{fmt_when(due, state.tz, state.now)} (staleness {limit})",
            due_at=due,
        )


@register("trigger", "cooldown")
class Cooldown(Params):
    """At least this long since the last stage (started or finished), whatever its outcome."""

    duration: PositiveDuration = Field(description="Minimum time between stages, e.g. '5m'.")

    def evaluate(self, state: TriggerState) -> Decision:
        limit = fmt_duration(self.duration)
        if state.last_stage_at is None:
            return leaf("cooldown", True, f"no stage yet (cooldown {limit})", "", order=1)
        ends = state.last_stage_at + self.duration
        ago = fmt_duration(state.now - state.last_stage_at)
        if state.now >= ends:
            return leaf(
                "cooldown",
                True,
                f"cooldown {limit} over (last stage {ago} ago)",
                "",
                due_at=ends,
                order=1,
            )
        at = fmt_clock(ends, state.tz, state.now)
        return leaf(
            "cooldown",
            False,
            f"cooldown ends {at} (last stage {ago} ago, cooldown {limit})",
            f"cooldown ends {at}",
            due_at=ends,
            order=1,
        )


@register("trigger", "surprise")
class Surprise(Params):
    """The pending data is new knowledge: its perplexity under the current model is at
    least ``ratio`` times the perplexity on already-learned holdout data.

    Losses come from ``chunk_scores`` (filled by the scorer subprocess). Until enough of
    the pending data is scored, ``unscored`` decides: ``wait`` (default) or ``fire``.
    With nothing learned yet, everything pending is new knowledge, so it fires.
    """

    ratio: PositiveFloat = Field(description="Perplexity ratio pending / learned holdout.")
    min_scored: Fraction = Field(0.5, description="Share of pending tokens that must be scored.")
    unscored: Literal["wait", "fire"] = Field(
        "wait", description="Verdict while pending data is not scored yet."
    )

    def evaluate(self, state: TriggerState) -> Decision:
        when = f"pending perplexity ≥ {self.ratio:g} × learned holdout"
        if state.pending_tokens <= 0:
            return leaf("surprise", False, "surprise: nothing pending", when)
        if state.learned_holdout_chunks == 0:
            return leaf(
                "surprise", True, "surprise: nothing learned yet, all pending data is new", when
            )
        scored = state.pending_scored_fraction
        if (
            state.pending_loss is None
            or state.learned_holdout_loss is None
            or scored < self.min_scored
        ):
            fire = self.unscored == "fire"
            what = (
                "learned holdout not scored yet"
                if state.learned_holdout_loss is None
                else f"pending data not scored yet ({scored:.0%} of tokens scored)"
            )
            verdict = "treated as surprising" if fire else "waiting for the scorer"
            return leaf("surprise", fire, f"surprise: {what}, {verdict}", when)
        ppl_new = math.exp(min(state.pending_loss, 50.0))
        ppl_old = math.exp(min(state.learned_holdout_loss, 50.0))
        actual = ppl_new / ppl_old if ppl_old > 0 else math.inf
        if actual >= self.ratio:
            return leaf(
                "surprise",
                True,
                f"pending data is new knowledge: perplexity {ppl_new:.1f} is {actual:.2f}×"
                f" learned holdout {ppl_old:.1f} (≥ {self.ratio:g}×)",
                when,
            )
        return leaf(
            "surprise",
            False,
            f"pending data is not surprising: perplexity {ppl_new:.1f} is {actual:.2f}×"
            f" learned holdout {ppl_old:.1f} (< {self.ratio:g}×)",
            f"{when} (now {actual:.2f}×)",
        )


@register("trigger", "serving_load")
class ServingLoad(Params):
    """Wait while serving is busy: every endpoint's ``vllm:num_requests_running`` must be
    at most ``max_running``. The engine fetches the numbers (``state.serving_running``:
    endpoint -> running requests, None = unreachable), so this stays pure."""

    max_running: NonNegInt = Field(description="Most running requests per endpoint to train.")
    unreachable: Literal["idle", "busy"] = Field(
        "idle", description="How to count an endpoint whose /metrics fails."
    )

    def evaluate(self, state: TriggerState) -> Decision:
        when = f"serving load ≤ {self.max_running} running requests"
        loads = state.serving_running
        if loads is None:
            return leaf("serving_load", True, "serving load not measured", when)
        if not loads:
            return leaf("serving_load", True, "no serving endpoints to check", when)
        busy: list[str] = []
        notes: list[str] = []
        for endpoint, running in sorted(loads.items()):
            if running is None:
                notes.append(f"{endpoint} unreachable (counted as {self.unreachable})")
                if self.unreachable == "busy":
                    busy.append(f"{endpoint} unreachable")
            elif running > self.max_running:
                busy.append(f"{endpoint} has {running:g} running requests")
        peak = max((v for v in loads.values() if v is not None), default=0.0)
        suffix = f" ({'; '.join(notes)})" if notes else ""
        if busy:
            return leaf(
                "serving_load",
                False,
                f"serving busy: {', '.join(busy)} (max {self.max_running}){suffix}",
                f"{when} (now {peak:g})",
            )
        if all(v is None for v in loads.values()):
            return leaf("serving_load", True, f"serving load unknown: {'; '.join(notes)}", when)
        return leaf(
            "serving_load",
            True,
            f"serving load ok: at most {peak:g} running requests (≤ {self.max_running}){suffix}",
            when,
        )


@register("trigger", "resources")
class Resources(Params):
    """Enough free memory to train (``state.free_memory_bytes``, from psutil)."""

    min_free_memory: Bytes = Field(description="Free memory needed, e.g. '4GiB'.")

    def evaluate(self, state: TriggerState) -> Decision:
        need = fmt_bytes(self.min_free_memory)
        when = f"free memory ≥ {need}"
        free = state.free_memory_bytes
        if free is None:
            return leaf("resources", True, "free memory not measured", when)
        if free >= self.min_free_memory:
            return leaf("resources", True, f"free memory {fmt_bytes(free)} ≥ {need}", when)
        return leaf(
            "resources",
            False,
            f"waiting for free memory ≥ {need} (now {fmt_bytes(free)})",
            f"{when} (now {fmt_bytes(free)})",
        )


__all__ = [
    "DEFAULT_TREE",
    "AllOf",
    "AnyOf",
    "Cooldown",
    "MaxStaleness",
    "MinNewTokens",
    "Resources",
    "ServingLoad",
    "Surprise",
    "Window",
    "build_trigger",
    "normalize_tree",
    "uses",
]
