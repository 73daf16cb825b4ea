"""Trigger policies and their combinators, table-driven with a fake clock.

Each case: the policy spec (as in TOML), the state snapshot, the expected verdict and a
piece of the expected reason text. The clock is a fixed instant (T0 = Sat 21 Nov 2026,
12:00 UTC), so reasons that mention times are exact.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from policies.base import TriggerState
from policies.triggers import Window, build_trigger

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC).timestamp()
H = 3600.0
M = 60.0


def state(**kw: Any) -> TriggerState:
    """A state at the fake clock T0 with 100 pending tokens unless told otherwise."""
    base = {"now": T0, "pending_tokens": 100, "oldest_pending_at": T0 - 10 * M, "tz": UTC}
    base.update(kw)
    return TriggerState(**base)


LEAF_CASES: list[tuple[str, dict[str, Any], TriggerState, bool, str]] = [
    # --- min_new_tokens
    (
        "tokens-below",
        {"name": "min_new_tokens", "n": 20000},
        state(pending_tokens=12400),
        False,
        "waiting for ≥ 20,000 new tokens (now 12,400)",
    ),
    (
        "tokens-equal",
        {"name": "min_new_tokens", "n": 20000},
        state(pending_tokens=20000),
        True,
        "20,000 new tokens pending, ≥ 20,000",
    ),
    # --- max_staleness
    (
        "stale-young",
        {"name": "max_staleness", "duration": "6h"},
        state(oldest_pending_at=T0 - 2 * H),
        False,
        "oldest pending data is 2h old; staleness limit 6h at 16:00",
    ),
    (
        "stale-old",
        {"name": "max_staleness", "duration": "6h"},
        state(oldest_pending_at=T0 - 6 * H - 10 * M),
        True,
        "oldest pending data is 6h 10m old (max staleness 6h)",
    ),
    (
        "stale-nothing",
        {"name": "max_staleness", "duration": "1d"},
        state(pending_tokens=0, oldest_pending_at=None),
        False,
        "nothing pending, so nothing is stale (max staleness 1d)",
    ),
    # --- cooldown
    (
        "cooldown-none",
        {"name": "cooldown", "duration": "5m"},
        state(last_stage_at=None),
        True,
        "no stage yet (cooldown 5m)",
    ),
    (
        "cooldown-active",
        {"name": "cooldown", "duration": "2h"},
        state(last_stage_at=T0 - 55 * M),
        False,
        "cooldown ends 13:05 (last stage 55m ago, cooldown 2h)",
    ),
    (
        "cooldown-over",
        {"name": "cooldown", "duration": "30s"},
        state(last_stage_at=T0 - 45),
        True,
        "cooldown 30s over (last stage 45s ago)",
    ),
    # --- window (cron start + duration)
    (
        "window-outside",
        {"name": "window", "cron": "0 2 * * *", "duration": "2h", "timezone": "UTC"},
        state(),
        False,
        "outside the maintenance window; it opens tomorrow at 02:00 for 2h",
    ),
    (
        "window-inside",
        {"name": "window", "cron": "0 11 * * *", "duration": "2h", "timezone": "UTC"},
        state(),
        True,
        "inside maintenance window until 13:00",
    ),
    (
        "window-just-closed",
        {"name": "window", "cron": "0 10 * * *", "duration": "2h", "timezone": "UTC"},
        state(),
        False,
        "it opens tomorrow at 10:00 for 2h",
    ),
    (
        "window-other-zone",
        # 13:00 in Paris (UTC+1 in November) is 12:00 UTC: inside.
        {"name": "window", "cron": "0 13 * * *", "duration": "30m", "timezone": "Europe/Paris"},
        state(),
        True,
        "inside maintenance window until 12:30",
    ),
    # --- surprise (perplexity ratio from chunk_scores)
    (
        "surprise-high",
        {"name": "surprise", "ratio": 1.5},
        state(
            pending_loss=math.log(45.0),
            pending_scored_fraction=1.0,
            learned_holdout_loss=math.log(12.0),
            learned_holdout_chunks=5,
        ),
        True,
        "pending data is new knowledge: perplexity 45.0 is 3.75× learned holdout 12.0 (≥ 1.5×)",
    ),
    (
        "surprise-low",
        {"name": "surprise", "ratio": 1.5},
        state(
            pending_loss=math.log(14.0),
            pending_scored_fraction=1.0,
            learned_holdout_loss=math.log(12.0),
            learned_holdout_chunks=5,
        ),
        False,
        "pending data is not surprising: perplexity 14.0 is 1.17× learned holdout 12.0 (< 1.5×)",
    ),
    (
        "surprise-unscored-wait",
        {"name": "surprise", "ratio": 1.5},
        state(pending_loss=None, learned_holdout_loss=2.0, learned_holdout_chunks=5),
        False,
        "surprise: pending data not scored yet (0% of tokens scored), waiting for the scorer",
    ),
    (
        "surprise-partly-scored-fire",
        {"name": "surprise", "ratio": 1.5, "unscored": "fire", "min_scored": 0.8},
        state(
            pending_loss=3.0,
            pending_scored_fraction=0.4,
            learned_holdout_loss=2.0,
            learned_holdout_chunks=5,
        ),
        True,
        "surprise: pending data not scored yet (40% of tokens scored), treated as surprising",
    ),
    (
        "surprise-holdout-unscored",
        {"name": "surprise", "ratio": 1.5},
        state(pending_loss=3.0, pending_scored_fraction=1.0, learned_holdout_chunks=5),
        False,
        "surprise: learned holdout not scored yet, waiting for the scorer",
    ),
    (
        "surprise-nothing-learned",
        {"name": "surprise", "ratio": 1.5},
        state(learned_holdout_chunks=0),
        True,
        "surprise: nothing learned yet, all pending data is new",
    ),
    # --- serving_load (numbers fetched by the engine)
    (
        "serving-idle",
        {"name": "serving_load", "max_running": 2},
        state(serving_running={"http://a:8000": 1.0, "http://b:8000": 0.0}),
        True,
        "serving load ok: at most 1 running requests (≤ 2)",
    ),
    (
        "serving-busy",
        {"name": "serving_load", "max_running": 2},
        state(serving_running={"http://a:8000": 5.0, "http://b:8000": 0.0}),
        False,
        "serving busy: http://a:8000 has 5 running requests (max 2)",
    ),
    (
        "serving-unreachable-idle",
        {"name": "serving_load", "max_running": 0},
        state(serving_running={"http://a:8000": None}),
        True,
        "serving load unknown: http://a:8000 unreachable (counted as idle)",
    ),
    (
        "serving-one-unreachable",
        {"name": "serving_load", "max_running": 1},
        state(serving_running={"http://a:8000": None, "http://b:8000": 1.0}),
        True,
        "serving load ok: at most 1 running requests (≤ 1) (http://a:8000 unreachable (counted"
        " as idle))",
    ),
    (
        "serving-unreachable-busy",
        {"name": "serving_load", "max_running": 0, "unreachable": "busy"},
        state(serving_running={"http://a:8000": None}),
        False,
        "serving busy: http://a:8000 unreachable",
    ),
    (
        "serving-no-endpoints",
        {"name": "serving_load", "max_running": 0},
        state(serving_running={}),
        True,
        "no serving endpoints to check",
    ),
    # --- resources
    (
        "memory-low",
        {"name": "resources", "min_free_memory": "4GiB"},
        state(free_memory_bytes=1024**3),
        False,
        "waiting for free memory ≥ 4.0 GiB (now 1.0 GiB)",
    ),
    (
        "memory-ok",
        {"name": "resources", "min_free_memory": "512MiB"},
        state(free_memory_bytes=2 * 1024**3),
        True,
        "free memory 2.0 GiB ≥ 512.0 MiB",
    ),
]


@pytest.mark.parametrize(
    ("spec", "st", "fire", "reason"),
    [c[1:] for c in LEAF_CASES],
    ids=[c[0] for c in LEAF_CASES],
)
def test_leaf(spec: dict[str, Any], st: TriggerState, fire: bool, reason: str) -> None:
    decision = build_trigger(spec).evaluate(st)
    assert decision.fire is fire
    assert len(decision.reasons) == 1
    assert reason in decision.reasons[0]


DEFAULT_TREE = {
    "all": [
        {"name": "cooldown", "duration": "5m"},
        {
            "any": [
                {"name": "min_new_tokens", "n": 20000},
                {"name": "max_staleness", "duration": "6h"},
            ]
        },
    ]
}

COMBINATOR_CASES: list[tuple[str, dict[str, Any], TriggerState, bool, str]] = [
    (
        # the example sentence, produced by the default-shaped tree
        "all-any-waiting",
        DEFAULT_TREE,
        state(pending_tokens=12400, oldest_pending_at=T0 - 4 * H, last_stage_at=T0 - 2 * M),
        False,
        "≥ 20,000 new tokens (now 12,400) or at 14:00 (staleness 6h), cooldown ends 12:03",
    ),
    (
        "all-any-tokens",
        DEFAULT_TREE,
        state(pending_tokens=24100, last_stage_at=T0 - H),
        True,
        "cooldown 5m over (last stage 1h ago); 24,100 new tokens pending, ≥ 20,000",
    ),
    (
        "all-any-stale-but-cooldown",
        DEFAULT_TREE,
        state(pending_tokens=10, oldest_pending_at=T0 - 7 * H, last_stage_at=T0 - M),
        False,
        "cooldown ends 12:04",
    ),
    (
        "any-first-true",
        {"any": [{"name": "min_new_tokens", "n": 5}, {"name": "max_staleness", "duration": "1d"}]},
        state(pending_tokens=10),
        True,
        "10 new tokens pending, ≥ 5",
    ),
    (
        "any-nested-all-parenthesised",
        {
            "any": [
                {"name": "min_new_tokens", "n": 50000},
                {
                    "all": [
                        {
                            "name": "window",
                            "cron": "0 2 * * *",
                            "duration": "1h",
                            "timezone": "UTC",
                        },
                        {"name": "min_new_tokens", "n": 1000},
                    ]
                },
            ]
        },
        state(pending_tokens=100),
        False,
        "≥ 50,000 new tokens (now 100) or (in the maintenance window (tomorrow at 02:00), ≥ 1,000 new tokens (now 100))",
    ),
    (
        "all-single-child",
        {"all": [{"name": "min_new_tokens", "n": 1}]},
        state(pending_tokens=1),
        True,
        "1 new tokens pending, ≥ 1",
    ),
]


@pytest.mark.parametrize(
    ("tree", "st", "fire", "summary"),
    [c[1:] for c in COMBINATOR_CASES],
    ids=[c[0] for c in COMBINATOR_CASES],
)
def test_combinator(tree: dict[str, Any], st: TriggerState, fire: bool, summary: str) -> None:
    decision = build_trigger(tree).evaluate(st)
    assert decision.fire is fire
    assert decision.summary == summary
    # every leaf's own sentence is kept for the events table
    assert len(decision.reasons) >= 1


def test_all_due_at_is_latest_time_condition() -> None:
    tree = {
        "all": [
            {"name": "cooldown", "duration": "1h"},
            {"name": "max_staleness", "duration": "3h"},
        ]
    }
    d = build_trigger(tree).evaluate(state(last_stage_at=T0 - 30 * M, oldest_pending_at=T0 - 1 * H))
    assert d.fire is False
    assert d.data["due_at"] == T0 + 2 * H  # staleness (14:00) is later than cooldown (12:30)
    d_any = build_trigger({"any": tree["all"]}).evaluate(
        state(last_stage_at=T0 - 30 * M, oldest_pending_at=T0 - 1 * H)
    )
    assert d_any.data["due_at"] == T0 + 30 * M


def test_leaves_list_every_leaf_with_verdict() -> None:
    d = build_trigger(DEFAULT_TREE).evaluate(state(pending_tokens=12400, last_stage_at=None))
    assert [(x["policy"], x["fire"]) for x in d.data["leaves"]] == [
        ("cooldown", True),
        ("min_new_tokens", False),
        ("max_staleness", False),
    ]


# --- window catch-up: a window missed during downtime runs once, not once per window
WINDOW = {"name": "window", "cron": "0 2 * * *", "duration": "1h", "timezone": "UTC"}
NIGHT2 = datetime(2026, 11, 21, 2, 0, tzinfo=UTC).timestamp()  # the latest missed window

CATCH_UP_CASES: list[tuple[str, dict[str, Any], bool, str]] = [
    (
        # down from Thursday evening to Saturday noon: two windows missed, one catch-up
        "missed-two-windows",
        {"last_gap": (NIGHT2 - 30 * H, T0), "last_stage_at": NIGHT2 - 40 * H},
        True,
        "missed the maintenance window of Sat 21 Nov 02:00 while down; catching up once",
    ),
    (
        "caught-up-already",
        {"last_gap": (NIGHT2 - 30 * H, T0 - 5 * M), "last_stage_at": T0 - 4 * M},
        False,
        "outside the maintenance window; it opens tomorrow at 02:00 for 1h",
    ),
    (
        "down-outside-windows-only",
        {"last_gap": (NIGHT2 + 2 * H, T0), "last_stage_at": None},
        False,
        "outside the maintenance window",
    ),
    (
        "up-during-window",
        # came back at 02:30, inside the window: nothing was missed
        {"last_gap": (NIGHT2 - 5 * H, NIGHT2 + 30 * M), "last_stage_at": None},
        False,
        "outside the maintenance window",
    ),
    (
        "catch-up-disabled",
        {"last_gap": (NIGHT2 - 30 * H, T0), "last_stage_at": None, "catch_up": False},
        False,
        "outside the maintenance window",
    ),
]


@pytest.mark.parametrize(
    ("kw", "fire", "reason"), [c[1:] for c in CATCH_UP_CASES], ids=[c[0] for c in CATCH_UP_CASES]
)
def test_window_catch_up(kw: dict[str, Any], fire: bool, reason: str) -> None:
    kw = dict(kw)
    spec = dict(WINDOW, catch_up=kw.pop("catch_up", True))
    decision = build_trigger(spec).evaluate(state(**kw))
    assert decision.fire is fire
    assert reason in decision.reasons[0]


def test_window_catch_up_runs_once() -> None:
    """After the catch-up stage starts, the same gap no longer fires the window."""
    policy = build_trigger(WINDOW)
    assert isinstance(policy, Window)
    st = state(last_gap=(NIGHT2 - 30 * H, T0), last_stage_at=None)
    assert policy.evaluate(st).fire is True
    after = replace(st, now=T0 + 10 * M, last_stage_at=T0 + M)
    assert policy.evaluate(after).fire is False


def test_window_uses_state_zone_when_unset() -> None:
    from zoneinfo import ZoneInfo

    spec = {"name": "window", "cron": "0 13 * * *", "duration": "1h"}
    paris = state(tz=ZoneInfo("Europe/Paris"))  # 12:00 UTC = 13:00 in Paris
    assert build_trigger(spec).evaluate(paris).fire is True
    assert build_trigger(spec).evaluate(state(tz=UTC)).fire is False


def test_missed_window_after_long_outage_with_frequent_cron() -> None:
    """A month down with a window every 10 minutes: the latest missed one is found."""
    spec = {"name": "window", "cron": "*/10 * * * *", "duration": "5m", "timezone": "UTC"}
    policy = build_trigger(spec)
    assert isinstance(policy, Window)
    gap_end = T0 + 7 * M  # came back at 12:07, after the 12:00-12:05 window
    st = state(now=gap_end, last_gap=(T0 - 31 * 86400, gap_end), last_stage_at=None)
    assert policy.missed_window(st) == T0
    decision = policy.evaluate(st)
    assert decision.fire is True
    assert "missed the maintenance window of Sat 21 Nov 12:00 while down" in decision.reasons[0]
