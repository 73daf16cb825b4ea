"""The registry and config-load validation: duplicates, malformed and unknown names, bad
parameters, each failing with the exact key path; and each policy kind's effective
default (from an empty config) is its class's default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import Field, ValidationError

from daemon import config as config_mod
from daemon.cli import main
from daemon.config import ConfigError
from policies import base
from policies.base import register
from policies.params import ParamError, Params
from policies.promotion import Gate
from policies.replay import DEFAULT_RATIO, Uniform
from policies.selection import HighestLoss
from policies.trigger_tree import DEFAULT_TREE
from policies.units import PositiveInt


@pytest.fixture
def cleanup() -> Iterator[list[tuple[str, str]]]:
    added: list[tuple[str, str]] = []
    yield added
    for kind, name in added:
        base.unregister(kind, name)


def test_register_and_get(cleanup: list[tuple[str, str]]) -> None:
    @register("trigger", "always_test")
    class Always(Params):
        k: PositiveInt = Field(1, description="a knob")

    cleanup.append(("trigger", "always_test"))
    assert base.get("trigger", "always_test") is Always
    assert "always_test" in base.names("trigger")
    assert base.describe("trigger", "always_test") == {"k": "a knob"}
    built = base.build("trigger", {"name": "always_test", "k": 3}, "policy.trigger")
    assert built.k == 3
    with pytest.raises(ParamError) as info:
        base.build("trigger", {"name": "always_test", "k": 0}, "policy.trigger")
    assert str(info.value) == "policy.trigger.k: must be a positive integer, got 0"


def test_duplicate_is_rejected() -> None:
    with pytest.raises(ValueError, match="replay policy 'uniform' is already registered"):
        register("replay", "uniform")(Uniform)


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("replay", "Uniform", "malformed replay policy name 'Uniform'"),
        ("replay", "has space", "malformed"),
        ("replay", "", "malformed"),
        ("replay", "1st", "malformed"),
        ("replay", "x" * 65, "malformed"),
        ("trigger", "all", "trigger policy name 'all' is reserved for a combinator"),
        ("trigger", "any", "reserved"),
        ("nonsense", "fine", "unknown policy kind 'nonsense'"),
    ],
)
def test_malformed_names_are_rejected(kind: str, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register(kind, name)


def test_unknown_name_lookup() -> None:
    with pytest.raises(KeyError, match="unknown replay policy 'nope'"):
        base.get("replay", "nope")


def test_direct_construction_runs_the_same_checks() -> None:
    with pytest.raises(ValidationError, match="must be a non-negative number, got -1"):
        Uniform(ratio=-1)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Uniform(ratio=1, half_life=2)  # type: ignore[call-arg]


# Each case: the policy section (as in TOML), the key path, and the problem text.
BAD_CONFIGS: list[tuple[dict[str, Any], str, str]] = [
    (
        {
            "trigger": {
                "all": [
                    {"name": "cooldown", "duration": "5m"},
                    {"any": [{"name": "min_new_tokens", "n": -3}]},
                ]
            }
        },
        "policy.trigger.all[1].any[0].n",
        "must be a positive integer, got -3",
    ),
    (
        {"trigger": {"any": [{"name": "min_new_tokens", "n": "lots"}]}},
        "policy.trigger.any[0].n",
        "must be a positive integer, got 'lots'",
    ),
    (
        {"trigger": {"name": "min_new_tokens", "n": True}},
        "policy.trigger.n",
        "must be a positive integer, got True",
    ),
    (
        {"trigger": {"all": [{"name": "cooldwn", "duration": "5m"}]}},
        "policy.trigger.all[0].name",
        "unknown trigger policy 'cooldwn' (known: cooldown, max_staleness, min_new_tokens,",
    ),
    ({"trigger": {"all": []}}, "policy.trigger.all", "must be a non-empty list"),
    (
        {"trigger": {"all": [{"n": 3}]}},
        "policy.trigger.all[0].name",
        "missing trigger policy name",
    ),
    (
        {"trigger": {"all": [{"name": "cooldown"}]}, "replay": {"name": "uniform"}},
        "policy.trigger.all[0].duration",
        "required parameter of trigger policy 'cooldown' is missing",
    ),
    (
        {"trigger": {"name": "cooldown", "duration": "5 minutes"}},
        "policy.trigger.duration",
        "must be a duration like '30s', '5m', '6h' or '1d', got '5 minutes'",
    ),
    (
        {"trigger": {"name": "cooldown", "duration": "5m", "extra": 1}},
        "policy.trigger.extra",
        "unknown parameter of trigger policy 'cooldown' (known: duration)",
    ),
    (
        {"trigger": {"name": "window", "cron": "0 2 * *"}},
        "policy.trigger.cron",
        "must be a 5-field crontab expression",
    ),
    (
        {"trigger": {"name": "window", "cron": "0 2 * * *", "timezone": "Mars/Olympus"}},
        "policy.trigger.timezone",
        "must be an IANA time zone",
    ),
    (
        {"trigger": {"name": "resources", "min_free_memory": "lots"}},
        "policy.trigger.min_free_memory",
        "must be a size like '512MiB'",
    ),
    (
        {"trigger": {"any": [{"name": "surprise", "ratio": 0}]}},
        "policy.trigger.any[0].ratio",
        "must be a positive number, got 0",
    ),
    (
        {"trigger": {"name": "min_new_tokens", "n": 5, "all": []}},
        "policy.trigger",
        "a node is either {name = ...}, all = [...] or any = [...]",
    ),
    ({"trigger": {"any": ["cooldown"]}}, "policy.trigger.any[0]", "must be a table"),
    ({"replay": {"name": "uniformly"}}, "policy.replay.name", "unknown replay policy"),
    ({"replay": {"name": "uniform", "ratio": -0.5}}, "policy.replay.ratio", "non-negative"),
    ({"replay": {"name": "recency", "half_life": 0}}, "policy.replay.half_life", "positive"),
    ({"replay": {"name": "balanced", "by": "author"}}, "policy.replay.by", "must be one of"),
    (
        {"promotion": {"name": "gate", "min_new_improvement": 5}},
        "policy.promotion.min_new_improvement",
        "must be a number between 0 and 1, got 5",
    ),
    (
        {"promotion": {"required": ["accuracy"]}},
        "policy.promotion.required",
        "unknown metric 'accuracy' (use new_loss, retention_loss, general_loss or eval:<name>)",
    ),
    ({"selection": {"name": "random"}}, "policy.selection.name", "unknown selection policy"),
    (
        {"selection": {"name": "highest_loss", "token_budget": -1}},
        "policy.selection.token_budget",
        "must be a non-negative integer",
    ),
]


@pytest.mark.parametrize(
    ("section", "path", "problem"),
    BAD_CONFIGS,
    ids=[f"{c[1]}-{i}" for i, c in enumerate(BAD_CONFIGS)],
)
def test_bad_policy_config_fails_at_load_with_key_path(
    tmp_path: Path, section: dict[str, Any], path: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.from_dict({"state_dir": str(tmp_path), "policy": section})
    assert info.value.path == path
    assert problem in info.value.problem


def test_config_check_command_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[policy.trigger]\nall = [{name = "cooldown", duration = "5m"},'
        ' {any = [{name = "min_new_tokens", n = 0}]}]\n'
    )
    result = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert result.exit_code == 1
    assert "policy.trigger.all[1].any[0].n: must be a positive integer, got 0" in result.output


def test_effective_defaults_are_the_policy_classes_defaults(tmp_path: Path) -> None:
    """One home per default: an empty config shows exactly what the classes declare."""
    pc = config_mod.from_dict({"state_dir": str(tmp_path)}).policy
    assert pc.replay == {"name": "uniform", "ratio": DEFAULT_RATIO}
    assert Uniform().ratio == DEFAULT_RATIO == 2.0
    assert pc.promotion == {"name": "gate", **Gate().model_dump()}
    assert pc.promotion["max_eval_drop_points"] == 5.0
    assert pc.selection == {"name": "highest_loss", **HighestLoss().model_dump()}
    assert pc.trigger == DEFAULT_TREE
    for kind in ("replay", "promotion", "selection"):
        assert base.default_name(kind) == getattr(pc, kind)["name"]


def test_section_without_name_is_the_default_policy_with_overrides(tmp_path: Path) -> None:
    pc = config_mod.from_dict(
        {"state_dir": str(tmp_path), "policy": {"promotion": {"max_eval_drop_points": 2}}}
    ).policy
    assert pc.promotion == {"name": "gate", **Gate(max_eval_drop_points=2).model_dump()}
    named = config_mod.from_dict(
        {"state_dir": str(tmp_path), "policy": {"replay": {"name": "recency"}}}
    ).policy
    assert named.replay == {"name": "recency", "ratio": DEFAULT_RATIO, "half_life": 2.0}


def test_config_show_prints_the_class_defaults(tmp_path: Path) -> None:
    """`evergreen config show` with no config prints replay ratio 2.0 and the gate's
    thresholds (they used to be declared twice, and disagreed)."""
    env = {"EVERGREEN_CONFIG": "", "EVERGREEN_STATE_DIR": str(tmp_path)}
    shown = CliRunner().invoke(main, ["config", "show"], env=env)
    assert shown.exit_code == 0, shown.output
    assert 'replay = { name = "uniform", ratio = 2.0 }' in shown.stdout
    assert "max_retention_regression = 0.05" in shown.stdout


def test_a_second_default_is_rejected(cleanup: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="replay already has a default policy 'uniform'"):

        @register("replay", "other_test", default=True)
        class Other(Uniform):
            pass

    cleanup.append(("replay", "other_test"))


@pytest.mark.parametrize("kind", ["trigger", "replay", "selection"])
def test_config_help_names_every_shipped_policy(kind: str) -> None:
    """`evergreen config show --keys` documents every policy a user can name."""
    helps = {path: text for path, _default, text in config_mod.iter_help()}
    text = helps[f"policy.{kind}"]
    for name in base.names(kind):
        if not name.endswith("_test"):
            assert name in text, f"policy.{kind} help does not mention {name!r}"
