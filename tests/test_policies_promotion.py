"""The promotion gate: promote only on improvement without forgetting; reject anything
regressing, NaN, infinite or missing, in every dimension, with the failing criteria."""

from __future__ import annotations

import math
from typing import Any

import pytest

from daemon import config as config_mod
from daemon.scheduling.planning import gate
from policies.base import PromotionPolicy, build
from store.contracts import GateVerdict

BASE = {
    "new_loss": 3.0,
    "retention_loss": 2.0,
    "general_loss": 2.5,
    "eval:qa": 60.0,
}
GOOD = {
    "new_loss": 2.0,  # -33 %
    "retention_loss": 2.05,  # +2.5 % (allowed 5 %)
    "general_loss": 2.5,
    "eval:qa": 58.0,  # -2 points (allowed 5)
}
SPEC = {
    "name": "gate",
    "min_new_improvement": 0.01,
    "max_retention_regression": 0.05,
    "max_general_regression": 0.05,
    "max_eval_drop_points": 5.0,
}


def decide(candidate: dict[str, Any], baseline: dict[str, Any] = BASE) -> Any:
    policy = build("promotion", SPEC, "policy.promotion")
    assert isinstance(policy, PromotionPolicy)
    return policy.decide(candidate, baseline)


def test_good_candidate_is_promoted_with_reasons() -> None:
    d = decide(GOOD)
    assert d.fire is True
    assert d.data["failed"] == []
    assert "new-data loss 3.0000 → 2.0000 (+33.3% improvement, need ≥ 1.0%)" in d.reasons
    assert "retention loss 2.0000 → 2.0500 (+2.5%, allowed ≤ +5.0%)" in d.reasons
    assert "eval:qa 60.0 → 58.0 points (-2.0, allowed drop ≤ 5)" in d.reasons


DIMENSIONS = ["new_loss", "retention_loss", "general_loss", "eval:qa"]
REGRESSING = {
    "new_loss": (2.99, "new-data loss 3.0000 → 2.9900 (+0.3% improvement, need ≥ 1.0%)"),
    "retention_loss": (2.2, "retention loss 2.0000 → 2.2000 (+10.0%, allowed ≤ +5.0%)"),
    "general_loss": (2.7, "general loss 2.5000 → 2.7000 (+8.0%, allowed ≤ +5.0%)"),
    "eval:qa": (54.0, "eval:qa 60.0 → 54.0 points (-6.0, allowed drop ≤ 5)"),
}


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_regressing_metric_rejects(dim: str) -> None:
    value, reason = REGRESSING[dim]
    d = decide({**GOOD, dim: value})
    assert d.fire is False
    assert d.data["failed"] == [reason]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "oops", None])
@pytest.mark.parametrize("dim", DIMENSIONS)
def test_nan_inf_or_missing_metric_rejects(dim: str, bad: Any) -> None:
    candidate = {**GOOD, dim: bad}
    if bad is None:
        del candidate[dim]
    d = decide(candidate)
    assert d.fire is False
    assert len(d.data["failed"]) == 1
    failed = d.data["failed"][0]
    assert failed.startswith(f"{dim}: ")
    expected = "missing from the candidate's metrics" if bad is None else "is not a finite number"
    assert expected in failed


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_nan_baseline_rejects(dim: str) -> None:
    d = decide(GOOD, {**BASE, dim: math.nan})
    assert d.fire is False
    assert d.data["failed"] == [f"{dim}: baseline value nan is not a finite number"]


def test_every_failing_criterion_is_listed() -> None:
    d = decide({k: REGRESSING[k][0] for k in DIMENSIONS})
    assert d.fire is False
    assert d.data["failed"] == [REGRESSING[k][1] for k in DIMENSIONS]
    assert d.summary.startswith("reject (4 failing): ")


def test_first_stage_without_retention_baseline() -> None:
    """Nothing learned yet: no retention set on either side is not a failure..."""
    base = {"new_loss": 3.0, "general_loss": 2.5}
    d = decide({"new_loss": 2.0, "general_loss": 2.5}, base)
    assert d.fire is True
    assert "retention loss: not measured (nothing learned yet), not compared" in d.reasons
    # ...but a NaN the candidate reports there still is
    d = decide({"new_loss": 2.0, "general_loss": 2.5, "retention_loss": math.nan}, base)
    assert d.fire is False
    # new_loss is always required
    d = decide({"general_loss": 2.5}, {"general_loss": 2.5})
    assert d.data["failed"] == ["new_loss: missing from the candidate's metrics"]


def test_no_general_anchor_on_either_side_is_reported_not_compared() -> None:
    d = decide({"new_loss": 2.0}, {"new_loss": 3.0})
    assert d.fire is True
    assert "general loss: not measured (no anchor set), not compared" in d.reasons


@pytest.mark.parametrize("dim", ["general_loss", "retention_loss", "eval:qa"])
def test_required_metrics_must_exist_even_without_baseline(dim: str) -> None:
    policy = build("promotion", {**SPEC, "required": [dim]}, "policy.promotion")
    d = policy.decide({"new_loss": 2.0}, {"new_loss": 3.0})
    assert d.fire is False
    assert d.data["failed"] == [f"{dim}: missing from the candidate's metrics"]


def test_new_eval_set_without_baseline_is_not_compared() -> None:
    d = decide({**GOOD, "eval:new": 10.0})
    assert d.fire is True
    assert "eval:new: new eval set, no baseline to compare" in d.reasons


def test_engine_gate_uses_configured_thresholds(tmp_path: Any) -> None:
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path),
            "policy": {"promotion": {**SPEC, "max_eval_drop_points": 1.0}},
        }
    )
    result = gate(cfg, GOOD, BASE)
    assert result.promote is False
    assert isinstance(result, GateVerdict)
    assert result.failed == ["eval:qa 60.0 → 58.0 points (-2.0, allowed drop ≤ 1)"]
    assert gate(config_mod.from_dict({"state_dir": str(tmp_path)}), GOOD, BASE).promote is True
