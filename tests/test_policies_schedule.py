"""The scheduler helper: missed runs coalesce into one, and a tick never runs twice at once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES

from daemon.scheduling.schedule import JOB_ID, build_scheduler, kick


def test_missed_runs_coalesce_into_one() -> None:
    """Ten missed hourly runs (a suspend, a stall) run once, then the schedule resumes."""
    calls: list[datetime] = []
    ran = threading.Event()

    def tick() -> None:
        calls.append(datetime.now(UTC))
        ran.set()

    start = datetime.now(UTC)
    # a grace long enough that every missed run would still be due without coalescing
    sched = build_scheduler(
        tick, interval_s=3600, misfire_grace_s=86400, first_run_at=start - timedelta(hours=10)
    )
    try:
        assert ran.wait(20)
        job = sched.get_job(JOB_ID)
        assert job.max_instances == 1
        assert job.misfire_grace_time == 86400
        assert job.next_run_time > start  # the next run is in the future, not a backlog
    finally:
        sched.shutdown(wait=True)
    assert len(calls) == 1


def test_kick_while_running_is_skipped_not_doubled() -> None:
    started = threading.Event()
    release = threading.Event()
    skipped = threading.Event()
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        started.set()
        release.wait(20)

    sched = build_scheduler(tick, interval_s=3600)
    sched.add_listener(lambda _e: skipped.set(), EVENT_JOB_MAX_INSTANCES)
    try:
        assert started.wait(20)
        kick(sched)  # e.g. an ingest finished while the tick is still running
        assert skipped.wait(20)
        assert len(calls) == 1
    finally:
        release.set()
        sched.shutdown(wait=True)
    assert len(calls) == 1


def test_default_misfire_grace_is_one_interval() -> None:
    sched = build_scheduler(lambda: None, interval_s=30, start=False)
    job = sched.get_job(JOB_ID)
    assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 30)


def test_kick_runs_an_idle_scheduler_now() -> None:
    ran = threading.Event()
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        ran.set()

    sched = build_scheduler(
        tick, interval_s=3600, first_run_at=datetime.now(UTC) + timedelta(hours=1)
    )
    try:
        kick(sched)
        assert ran.wait(20)
    finally:
        sched.shutdown(wait=True)
    assert calls == [1]


def test_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s must be positive"):
        build_scheduler(lambda: None, interval_s=0)


def test_start_scheduler_is_the_daemons_entry_point() -> None:
    from daemon.scheduling.schedule import start_scheduler

    ran = threading.Event()
    sched = start_scheduler(ran.set, 30)
    try:
        assert ran.wait(20)  # first run is immediate
        job = sched.get_job(JOB_ID)
        assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 30)
    finally:
        sched.shutdown(wait=True)
