"""Bad policy config never crashes the loader: any TOML-shaped value in a policy section
is either accepted or rejected with a ConfigError that names a key under ``policy.``."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import config as config_mod
from daemon.config import ConfigError
from daemon.scheduling.spec import build_all
from policies.base import TriggerState
from policies.units import parse_bytes, parse_duration

NOW = 1_795_000_000.0
STATES = [
    TriggerState(now=NOW),
    TriggerState(
        now=NOW,
        pending_tokens=10**9,
        oldest_pending_at=0.0,
        last_stage_at=NOW + 10**6,
        pending_loss=1e9,
        pending_scored_fraction=1.0,
        learned_holdout_loss=-1e9,
        learned_holdout_chunks=1,
        last_gap=(0.0, NOW),
        serving_running={"x": None, "y": 1e9},
        free_memory_bytes=0,
    ),
]

NAMES = st.sampled_from(
    ["min_new_tokens", "max_staleness", "cooldown", "window", "surprise", "serving_load",
     "resources", "uniform", "recency", "most_forgotten", "balanced", "gate", "highest_loss",
     "fifo", "nope", "all", "any"]
)  # fmt: skip
KEYS = st.sampled_from(
    ["name", "n", "duration", "cron", "timezone", "catch_up", "ratio", "min_scored",
     "unscored", "max_running", "unreachable", "min_free_memory", "half_life", "explore",
     "by", "token_budget", "required", "all", "any", "x"]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["5m", "1h30m", "0 2 * * *", "2GiB", "UTC", "wait", "idle", "source"]),
    NAMES,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(KEYS, inner, max_size=4),
        st.fixed_dictionaries({"name": NAMES}, optional={"n": inner, "duration": inner}),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(["trigger", "replay", "promotion", "selection"]), value=VALUES)
def test_policy_sections_fail_cleanly(section: str, value: Any) -> None:
    try:
        cfg = config_mod.from_dict({"state_dir": "/tmp/evergreen-fuzz", "policy": {section: value}})
    except ConfigError as exc:
        assert exc.path.startswith("policy.")
        assert exc.problem
        return
    # accepted: evaluating it must not crash either, whatever the state
    trigger = build_all(cfg).trigger
    for state in STATES:
        decision = trigger.evaluate(state)
        assert decision.reasons


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(SCALARS, st.text(max_size=20)))
def test_units_raise_value_error_only(value: Any) -> None:
    for parse in (parse_duration, parse_bytes):
        try:
            result = parse(value)
        except ValueError:
            continue
        assert result >= 0
