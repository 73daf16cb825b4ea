"""Trigger policies: when to start a training stage.

Each leaf is a small dataclass with ``evaluate(state) -> Decision``; ``all``/``any``
combine them as the config tree says. Every decision explains itself twice:

* ``reasons``: one self-contained sentence per leaf (written to the events table);
* ``data["when"]`` / ``summary``: the condition phrased for "next stage when ...", so the
  whole tree reads as one line, e.g. ``next stage when ≥ 20,000 new tokens (now 12,400)
  or at 02:00 (staleness 6h), cooldown ends 14:05``.

Time-based leaves also give ``data["due_at"]``: the moment they become true if nothing
else changes, which the combinators fold into an estimate of the next stage.
"""

from __future__ import annotations

import math
import zoneinfo
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from daemon.config import ConfigError
from policies.base import Decision, Params, TriggerPolicy, TriggerState, build, param, register
from policies.units import (
    boolean,
    choice,
    fmt_bytes,
    fmt_clock,
    fmt_duration,
    fmt_int,
    fmt_when,
    fraction,
    nonneg_int,
    parse_bytes,
    positive_duration,
    positive_float,
    positive_int,
    text,
)


def _leaf(
    name: str, fire: bool, reason: str, when: str, *, due_at: float | None = None, order: int = 0
) -> Decision:
    data: dict[str, Any] = {
        "policy": name,
        "when": when,
        "leaves": [{"policy": name, "fire": fire, "reason": reason}],
        "order": order,
    }
    if due_at is not None:
        data["due_at"] = due_at
    return Decision(fire=fire, reasons=[reason], data=data)


# ----------------------------------------------------------------------------- leaves
@register("trigger", "min_new_tokens")
@dataclass
class MinNewTokens(Params):
    """Fire once at least ``n`` new (pending, train split) tokens are waiting."""

    n: int = param(positive_int, help="Pending train tokens needed to start a stage.")

    def evaluate(self, state: TriggerState) -> Decision:
        fire = state.pending_tokens >= self.n
        cond = f"≥ {fmt_int(self.n)} new tokens (now {fmt_int(state.pending_tokens)})"
        reason = (
            f"{fmt_int(state.pending_tokens)} new tokens pending, ≥ {fmt_int(self.n)}"
            if fire
            else f"waiting for ≥ {fmt_int(self.n)} new tokens (now {fmt_int(state.pending_tokens)})"
        )
        return _leaf("min_new_tokens", fire, reason, cond)


@register("trigger", "max_staleness")
@dataclass
class MaxStaleness(Params):
    """Train anyway once the oldest pending data is this old (bounds model staleness)."""

    duration: float = param(positive_duration, help="Maximum age of pending data, e.g. '6h'.")

    def evaluate(self, state: TriggerState) -> Decision:
        limit = fmt_duration(self.duration)
        if state.oldest_pending_at is None:
            return _leaf(
                "max_staleness",
                False,
                f"nothing pending, so nothing is stale (max staleness {limit})",
                f"data is {limit} old",
            )
        age = state.now - state.oldest_pending_at
        due = state.oldest_pending_at + self.duration
        if age >= self.duration:
            return _leaf(
                "max_staleness",
                True,
                f"oldest pending data is {fmt_duration(age)} old (max staleness {limit})",
                f"data is {limit} old",
                due_at=due,
            )
        return _leaf(
            "max_staleness",
            False,
            f"oldest pending data is {fmt_duration(age)} old; staleness limit {limit} at"
            f" {fmt_clock(due, state.tz, state.now)}",
            f"{fmt_when(due, state.tz, state.now)} (staleness {limit})",
            due_at=due,
        )


@register("trigger", "cooldown")
@dataclass
class Cooldown(Params):
    """At least this long since the last stage (started or finished), whatever its outcome."""

    duration: float = param(positive_duration, help="Minimum time between stages, e.g. '5m'.")

    def evaluate(self, state: TriggerState) -> Decision:
        limit = fmt_duration(self.duration)
        if state.last_stage_at is None:
            return _leaf("cooldown", True, f"no stage yet (cooldown {limit})", "", order=1)
        ends = state.last_stage_at + self.duration
        ago = fmt_duration(state.now - state.last_stage_at)
        if state.now >= ends:
            return _leaf(
                "cooldown",
                True,
                f"cooldown {limit} over (last stage {ago} ago)",
                "",
                due_at=ends,
                order=1,
            )
        at = fmt_clock(ends, state.tz, state.now)
        return _leaf(
            "cooldown",
            False,
            f"cooldown ends {at} (last stage {ago} ago, cooldown {limit})",
            f"cooldown ends {at}",
            due_at=ends,
            order=1,
        )


def _cron(value: Any) -> str:
    expr = text(value)
    try:
        CronTrigger.from_crontab(expr)
    except ValueError as exc:
        raise ValueError(f"must be a 5-field crontab expression ({exc}), got {value!r}") from None
    return expr


def _timezone(value: Any) -> str:
    name = text(value)
    if name:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"must be an IANA time zone like 'Europe/Paris', got {value!r}"
            ) from None
    return name


@register("trigger", "window")
@dataclass
class Window(Params):
    """Only inside a maintenance window: it opens at each ``cron`` time for ``duration``.

    Uses APScheduler's ``CronTrigger`` for the calendar arithmetic. With ``catch_up``, a
    window that opened and closed while the daemon was down (``state.last_gap``) counts
    as open until one stage has started after it: after downtime a missed window runs
    once, however many windows were missed, and never more than once.
    """

    cron: str = param(_cron, help="Crontab expression for the window start, e.g. '0 2 * * *'.")
    duration: float = param(positive_duration, "2h", help="How long the window stays open.")
    timezone: str = param(_timezone, "", help="IANA zone for the cron ('' = the daemon's zone).")
    catch_up: bool = param(boolean, True, help="Run once after downtime that missed a window.")
    _triggers: dict[str, CronTrigger] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _trigger(self, tz: tzinfo) -> CronTrigger:
        zone: tzinfo = zoneinfo.ZoneInfo(self.timezone) if self.timezone else tz
        key = str(zone)
        if key not in self._triggers:
            self._triggers[key] = CronTrigger.from_crontab(self.cron, timezone=zone)
        return self._triggers[key]

    def _next_open(self, trig: CronTrigger, after: float, tz: tzinfo) -> float | None:
        nxt = trig.get_next_fire_time(None, datetime.fromtimestamp(after, tz))
        return nxt.timestamp() if nxt is not None else None

    def missed_window(self, state: TriggerState) -> float | None:
        """Start of the latest window whose end fell inside the last downtime gap."""
        if not self.catch_up or state.last_gap is None:
            return None
        gap_start, gap_end = state.last_gap
        # window [t, t + duration) ended inside the gap: gap_start < t + duration <= gap_end
        return self._last_open(
            state.tz, floor=gap_start - self.duration, limit=gap_end - self.duration
        )

    def _last_open(self, tz: tzinfo, *, floor: float, limit: float) -> float | None:
        """The latest window opening t with floor < t <= limit, or None.

        CronTrigger only looks forward, so look back from ``limit`` over growing spans
        and walk forward inside the first span that has an opening: the walk stays short
        even for a minutely cron after a month-long outage.
        """
        trig = self._trigger(tz)
        for lookback in (
            3600.0,
            86400.0,
            7 * 86400.0,
            32 * 86400.0,
            367 * 86400.0,
            11 * 366 * 86400.0,
        ):
            start = max(floor, limit - lookback)
            t = self._next_open(trig, start + 1e-3, tz)
            if t is not None and t <= limit:
                for _ in range(100_000):
                    nxt = self._next_open(trig, t + 1e-3, tz)
                    if nxt is None or nxt > limit:
                        break
                    t = nxt
                return t
            if start <= floor:
                return None
        return None

    def evaluate(self, state: TriggerState) -> Decision:
        trig = self._trigger(state.tz)
        span = fmt_duration(self.duration)
        # A window is open at `now` iff some opening t satisfies now - duration < t <= now.
        t = self._next_open(trig, state.now - self.duration + 1e-3, state.tz)
        if t is not None and t <= state.now:
            end = t + self.duration
            return _leaf(
                "window",
                True,
                f"inside maintenance window until {fmt_clock(end, state.tz, state.now)}",
                "",
            )
        missed = self.missed_window(state)
        if missed is not None and (state.last_stage_at is None or state.last_stage_at < missed):
            return _leaf(
                "window",
                True,
                f"missed the maintenance window of {fmt_clock(missed, state.tz)} while down;"
                " catching up once",
                "",
            )
        nxt = self._next_open(trig, state.now, state.tz)
        if nxt is None:
            return _leaf("window", False, "the maintenance window never opens again", "never")
        at = fmt_when(nxt, state.tz, state.now)
        return _leaf(
            "window",
            False,
            f"outside the maintenance window; it opens {at} for {span}",
            f"in the maintenance window ({at.removeprefix('at ')})",
            due_at=nxt,
        )


@register("trigger", "surprise")
@dataclass
class Surprise(Params):
    """The pending data is new knowledge: its perplexity under the current model is at
    least ``ratio`` times the perplexity on already-learned holdout data.

    Losses come from ``chunk_scores`` (filled by the scorer subprocess). Until enough of
    the pending data is scored, ``unscored`` decides: ``wait`` (default) or ``fire``.
    With nothing learned yet, everything pending is new knowledge, so it fires.
    """

    ratio: float = param(positive_float, help="Perplexity ratio pending / learned holdout.")
    min_scored: float = param(fraction, 0.5, help="Share of pending tokens that must be scored.")
    unscored: str = param(
        choice("wait", "fire"), "wait", help="Verdict while pending data is not scored yet."
    )

    def evaluate(self, state: TriggerState) -> Decision:
        when = f"pending perplexity ≥ {self.ratio:g} × learned holdout"
        if state.pending_tokens <= 0:
            return _leaf("surprise", False, "surprise: nothing pending", when)
        if state.learned_holdout_chunks == 0:
            return _leaf(
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
            return _leaf("surprise", fire, f"surprise: {what}, {verdict}", when)
        ppl_new = math.exp(min(state.pending_loss, 50.0))
        ppl_old = math.exp(min(state.learned_holdout_loss, 50.0))
        actual = ppl_new / ppl_old if ppl_old > 0 else math.inf
        if actual >= self.ratio:
            return _leaf(
                "surprise",
                True,
                f"pending data is new knowledge: perplexity {ppl_new:.1f} is {actual:.2f}×"
                f" learned holdout {ppl_old:.1f} (≥ {self.ratio:g}×)",
                when,
            )
        return _leaf(
            "surprise",
            False,
            f"pending data is not surprising: perplexity {ppl_new:.1f} is {actual:.2f}×"
            f" learned holdout {ppl_old:.1f} (< {self.ratio:g}×)",
            f"{when} (now {actual:.2f}×)",
        )


@register("trigger", "serving_load")
@dataclass
class ServingLoad(Params):
    """Wait while serving is busy: every endpoint's ``vllm:num_requests_running`` must be
    at most ``max_running``. The engine fetches the numbers (``state.serving_running``:
    endpoint -> running requests, None = unreachable), so this stays pure."""

    max_running: int = param(nonneg_int, help="Most running requests per endpoint to train.")
    unreachable: str = param(
        choice("idle", "busy"), "idle", help="How to count an endpoint whose /metrics fails."
    )

    def evaluate(self, state: TriggerState) -> Decision:
        when = f"serving load ≤ {self.max_running} running requests"
        loads = state.serving_running
        if loads is None:
            return _leaf("serving_load", True, "serving load not measured", when)
        if not loads:
            return _leaf("serving_load", True, "no serving endpoints to check", when)
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
            return _leaf(
                "serving_load",
                False,
                f"serving busy: {', '.join(busy)} (max {self.max_running}){suffix}",
                f"{when} (now {peak:g})",
            )
        if all(v is None for v in loads.values()):
            return _leaf("serving_load", True, f"serving load unknown: {'; '.join(notes)}", when)
        return _leaf(
            "serving_load",
            True,
            f"serving load ok: at most {peak:g} running requests (≤ {self.max_running}){suffix}",
            when,
        )


@register("trigger", "resources")
@dataclass
class Resources(Params):
    """Enough free memory to train (``state.free_memory_bytes``, from psutil)."""

    min_free_memory: int = param(parse_bytes, help="Free memory needed, e.g. '4GiB'.")

    def evaluate(self, state: TriggerState) -> Decision:
        need = fmt_bytes(self.min_free_memory)
        when = f"free memory ≥ {need}"
        free = state.free_memory_bytes
        if free is None:
            return _leaf("resources", True, "free memory not measured", when)
        if free >= self.min_free_memory:
            return _leaf("resources", True, f"free memory {fmt_bytes(free)} ≥ {need}", when)
        return _leaf(
            "resources",
            False,
            f"waiting for free memory ≥ {need} (now {fmt_bytes(free)})",
            f"{when} (now {fmt_bytes(free)})",
        )


# ----------------------------------------------------------------------------- combinators
def _children_leaves(children: list[Decision]) -> list[dict[str, Any]]:
    return [leaf for d in children for leaf in d.data.get("leaves", [])]


def _wait_text(d: Decision, *, inside: str) -> str:
    when = str(d.data.get("summary") or d.data.get("when") or "; ".join(d.reasons))
    # "," (all) binds looser than "or" (any), so only an all-group inside an any needs ().
    if inside == "any" and d.data.get("combinator") == "all" and d.data.get("n_parts", 1) > 1:
        return f"({when})"
    return when


def _fire_text(d: Decision) -> str:
    return str(d.data.get("summary") or "; ".join(d.reasons))


@dataclass
class AllOf:
    """Fires when every child fires. Waiting text lists the unmet children."""

    children: list[TriggerPolicy]

    def evaluate(self, state: TriggerState) -> Decision:
        results = [c.evaluate(state) for c in self.children]
        fire = all(d.fire for d in results)
        reasons = [r for d in results for r in d.reasons]
        if fire:
            parts = [_fire_text(d) for d in results]
            due = None
        else:
            unmet = sorted((d for d in results if not d.fire), key=lambda d: d.data.get("order", 0))
            parts = [_wait_text(d, inside="all") for d in unmet]
            dues = [d.data.get("due_at") for d in unmet]
            due = max(dues) if dues and all(x is not None for x in dues) else None  # type: ignore[type-var]
        data: dict[str, Any] = {
            "combinator": "all",
            "summary": ("; " if fire else ", ").join(p for p in parts if p),
            "n_parts": len([p for p in parts if p]),
            "leaves": _children_leaves(results),
            "children": [d.data | {"fire": d.fire, "reasons": d.reasons} for d in results],
        }
        if due is not None:
            data["due_at"] = due
        return Decision(fire=fire, reasons=reasons, data=data)


@dataclass
class AnyOf:
    """Fires when at least one child fires. Waiting text joins the children with "or"."""

    children: list[TriggerPolicy]

    def evaluate(self, state: TriggerState) -> Decision:
        results = [c.evaluate(state) for c in self.children]
        fire = any(d.fire for d in results)
        if fire:
            firing = [d for d in results if d.fire]
            parts = [_fire_text(d) for d in firing]
            reasons = [r for d in firing for r in d.reasons]
            due = None
        else:
            parts = [_wait_text(d, inside="any") for d in results]
            reasons = [r for d in results for r in d.reasons]
            dues = [d.data["due_at"] for d in results if d.data.get("due_at") is not None]
            due = min(dues) if dues else None
        data: dict[str, Any] = {
            "combinator": "any",
            "summary": ("; " if fire else " or ").join(p for p in parts if p),
            "n_parts": len([p for p in parts if p]),
            "leaves": _children_leaves(results),
            "children": [d.data | {"fire": d.fire, "reasons": d.reasons} for d in results],
        }
        if due is not None:
            data["due_at"] = due
        return Decision(fire=fire, reasons=reasons, data=data)


def build_trigger(tree: Any, path: str = "policy.trigger") -> TriggerPolicy:
    """Build a trigger tree: ``{name=..., params}`` leaves, ``{all=[...]}``/``{any=[...]}``.

    Every problem raises :class:`ConfigError` naming the exact node, e.g.
    ``policy.trigger.all[1].any[0].n: must be a positive integer, got -3``.
    """
    if not isinstance(tree, dict):
        raise ConfigError(
            path, f"must be a table ({{name = ...}}, all = [...] or any = [...]), got {tree!r}"
        )
    combos = [k for k in ("all", "any") if k in tree]
    if combos:
        if len(tree) != 1:
            extra = ", ".join(sorted(k for k in tree if k != combos[0]))
            raise ConfigError(
                path,
                f"a node is either {{name = ...}}, all = [...] or any = [...]; also got {extra}",
            )
        key = combos[0]
        items = tree[key]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{path}.{key}", "must be a non-empty list of trigger nodes")
        children = [build_trigger(item, f"{path}.{key}[{i}]") for i, item in enumerate(items)]
        return AllOf(children) if key == "all" else AnyOf(children)
    policy: TriggerPolicy = build("trigger", tree, path)
    return policy


def uses(tree: Any, name: str) -> bool:
    """Whether the (already validated) tree has a leaf called ``name``."""
    if isinstance(tree, dict):
        if tree.get("name") == name:
            return True
        return any(uses(c, name) for k in ("all", "any") for c in tree.get(k, []) or [])
    return False


__all__ = [
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
    "uses",
]
