"""When the daemon evaluates its trigger policy: an APScheduler interval job, plus a kick.

Settings, and why:

* ``max_instances=1``: a tick that is still running (planning a stage, probing a slow
  vLLM) is never run twice at once; a kick that lands meanwhile is skipped, and the
  running tick or the next interval sees the new data.
* ``coalesce=True``: after a stall or a suspend, all the runs that were missed collapse
  into one run, not a burst of them.
* ``misfire_grace_time = interval``: the newest missed run time is always less than one
  interval old, so the coalesced run always happens (APScheduler skips a run later than
  its grace), and an older one is superseded by it.
* The first run is immediate (``next_run_time=now``): a restarted daemon looks at its
  store at once. Missed *maintenance windows* across a restart are handled by the
  ``window`` trigger's ``catch_up`` (the engine records downtime gaps), so a window that
  passed while the daemon was down runs once, not once per missed window.

The tick itself is the daemon's (typically: ``explain_next`` and, when it fires, plan and
start a stage); it must catch its own exceptions, or APScheduler only logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

JOB_ID = "evergreen-policy-tick"


def build_scheduler(
    tick: Callable[[], Any],
    *,
    interval_s: float,
    misfire_grace_s: float | None = None,
    first_run_at: datetime | None = None,
    start: bool = True,
) -> BackgroundScheduler:
    """A BackgroundScheduler running ``tick`` every ``interval_s`` (see module docstring).

    Returns it started (``start=False`` for callers that add more jobs first). Stop it
    with ``scheduler.shutdown(wait=True)`` so a running tick finishes first.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s!r}")
    grace = max(1, round(misfire_grace_s if misfire_grace_s is not None else interval_s))
    scheduler = BackgroundScheduler(
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": grace},
    )
    scheduler.add_job(
        tick,
        IntervalTrigger(seconds=interval_s, timezone=UTC),
        id=JOB_ID,
        name="evaluate trigger policy",
        next_run_time=first_run_at or datetime.now(UTC),
        coalesce=True,
        max_instances=1,
        misfire_grace_time=grace,
        replace_existing=True,
    )
    if start:
        scheduler.start()
    return scheduler


def kick(scheduler: BackgroundScheduler) -> None:
    """Evaluate now (e.g. right after an ingest) instead of at the next interval.

    Skipped, not queued, if a tick is running (``max_instances=1``). The interval
    restarts from this run.
    """
    job = scheduler.get_job(JOB_ID)
    if job is not None:
        job.modify(next_run_time=datetime.now(UTC))


def start_scheduler(
    tick: Callable[[], Any], interval_s: float, **kwargs: Any
) -> BackgroundScheduler:
    """``build_scheduler`` with the interval as a positional argument (the daemon's call)."""
    return build_scheduler(tick, interval_s=interval_s, **kwargs)
