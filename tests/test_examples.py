"""Every shipped config validates: examples/*.toml and systemd/*.toml load without error,
and their policy trees build and evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config as config_mod
from daemon.scheduling.spec import build_all
from policies.base import TriggerState

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*ROOT.glob("examples/*.toml"), *ROOT.glob("systemd/*.toml")])


def test_examples_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"minimal.toml", "nightly-window.toml", "aggressive.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_config_validates(path: Path, tmp_path: Path) -> None:
    cfg = config_mod.load(path, overrides={"state_dir": str(tmp_path)})
    policies = build_all(cfg)
    decision = policies.trigger.evaluate(TriggerState(now=1_800_000_000.0, pending_tokens=10))
    assert decision.reasons  # every tree explains itself
    # the rendered effective config is itself a valid config
    again = tmp_path / "again.toml"
    again.write_text(config_mod.to_toml(cfg))
    assert config_mod.load(again).policy == cfg.policy
