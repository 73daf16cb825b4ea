"""The ``window`` trigger: train only inside a maintenance window given as a cron time.

Kept apart from the other leaves because of its calendar arithmetic (APScheduler's
``CronTrigger``) and the catch-up rule for windows missed while the daemon was down.
"""

from __future__ import annotations

import zoneinfo
from datetime import datetime, tzinfo
from typing import Annotated, Any

from apscheduler.triggers.cron import CronTrigger
from pydantic import BeforeValidator, Field, PrivateAttr

from policies.base import Decision, TriggerState, register
from policies.params import Params
from policies.trigger_tree import leaf
from policies.units import Bool, PositiveDuration, fmt_clock, fmt_duration, fmt_when, text


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


Cron = Annotated[str, BeforeValidator(_cron)]
TimeZone = Annotated[str, BeforeValidator(_timezone)]


@register("trigger", "window")
class Window(Params):
    """Only inside a maintenance window: it opens at each ``cron`` time for ``duration``.

    Uses APScheduler's ``CronTrigger`` for the calendar arithmetic. With ``catch_up``, a
    window that opened and closed while the daemon was down (``state.last_gap``) counts
    as open until one stage has started after it: after downtime a missed window runs
    once, however many windows were missed, and never more than once.
    """

    cron: Cron = Field(description="Crontab expression for the window start, e.g. '0 2 * * *'.")
    duration: PositiveDuration = Field(2 * 3600.0, description="How long the window stays open.")
    timezone: TimeZone = Field("", description="IANA zone for the cron ('' = the daemon's zone).")
    catch_up: Bool = Field(True, description="Run once after downtime that missed a window.")
    _triggers: dict[str, CronTrigger] = PrivateAttr(default_factory=dict)

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
            return leaf(
                "window",
                True,
                f"inside maintenance window until {fmt_clock(end, state.tz, state.now)}",
                "",
            )
        missed = self.missed_window(state)
        if missed is not None and (state.last_stage_at is None or state.last_stage_at < missed):
            return leaf(
                "window",
                True,
                f"missed the maintenance window of {fmt_clock(missed, state.tz)} while down;"
                " catching up once",
                "",
            )
        nxt = self._next_open(trig, state.now, state.tz)
        if nxt is None:
            return leaf("window", False, "the maintenance window never opens again", "never")
        at = fmt_when(nxt, state.tz, state.now)
        return leaf(
            "window",
            False,
            f"outside the maintenance window; it opens {at} for {span}",
            f"in the maintenance window ({at.removeprefix('at ')})",
            due_at=nxt,
        )
