"""The promotion gate: promote a candidate adapter only if it learned without forgetting.

Metrics are the evaluator's (lower loss is better; eval sets score 0–100 points):

* ``new_loss``: holdout loss on the stage's new data; must improve by ≥ ``min_new_improvement``
  (relative, 0.01 = 1 %) over the baseline (the current adapter);
* ``retention_loss`` (holdout of already-learned data) and ``general_loss`` (general
  anchor text) may regress by at most ``max_retention_regression`` / ``max_general_regression``;
* ``eval:<name>``: no user eval set may drop by more than ``max_eval_drop_points``.

Anything not finite, or missing where a comparison is required, rejects: a broken
evaluation must never promote. ``new_loss`` is always required, and so is every metric
listed in ``required``. Any other dimension is required once the baseline has it: the
baseline and the candidate are measured by the same evaluation run, so a metric only the
baseline has means the candidate's evaluation broke, while a metric neither has means
that set does not exist (nothing learned yet, so no retention set; no general anchor
configured) and is reported as not compared. Every criterion, failing or passing, is in
the reasons, so a rejection reads as a report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from policies.base import Decision, register
from policies.params import Params
from policies.units import Fraction, NonNegFloat

ALWAYS_REQUIRED = ("new_loss",)
DIMENSIONS = ("new_loss", "retention_loss", "general_loss")


def _metric_names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of metric names, got {value!r}")
    for name in value:
        if name not in DIMENSIONS and not name.startswith("eval:"):
            raise ValueError(
                f"unknown metric {name!r} (use {', '.join(DIMENSIONS)} or eval:<name>)"
            )
    return list(value)


MetricNames = Annotated[list[str], BeforeValidator(_metric_names)]


def _num(metrics: dict[str, Any], key: str) -> float | None:
    """The metric as a float; None if absent; NaN if present but not a finite number."""
    if key not in metrics or metrics[key] is None:
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _rel(cand: float, base: float) -> float:
    """Relative change (cand − base) / base, guarded for a zero baseline."""
    if base == 0:
        return 0.0 if cand == 0 else math.copysign(math.inf, cand)
    return (cand - base) / abs(base)


@register("promotion", "gate", default=True)
class Gate(Params):
    """Promote only if new-data loss improves and nothing else regresses too much."""

    min_new_improvement: Fraction = Field(
        0.01, description="Relative improvement of new-data holdout loss needed (0.01 = 1%)."
    )
    max_retention_regression: Fraction = Field(
        0.05, description="Largest relative rise of retention loss allowed (0.05 = 5%)."
    )
    max_general_regression: Fraction = Field(
        0.05, description="Largest relative rise of general-anchor loss allowed."
    )
    max_eval_drop_points: NonNegFloat = Field(
        5.0, description="Largest drop of any user eval set, in points (0-100)."
    )
    required: MetricNames = Field(
        default_factory=list,
        description="Metrics that must exist even without a baseline (new_loss always does).",
    )

    def _needed(self, key: str) -> bool:
        return key in ALWAYS_REQUIRED or key in self.required

    def decide(self, candidate: dict[str, Any], baseline: dict[str, Any]) -> Decision:
        r = _Report(candidate, baseline)
        self._new(r)
        self._loss(r, "retention_loss", "retention", self.max_retention_regression)
        self._loss(r, "general_loss", "general", self.max_general_regression)
        self._evals(r)
        fire = not r.failed
        head = "promote" if fire else f"reject ({len(r.failed)} failing)"
        return Decision(
            fire=fire,
            reasons=r.failed + r.passed,
            data={
                "failed": r.failed,
                "failed_metrics": r.failed_metrics,
                "passed": r.passed,
                "summary": f"{head}: " + "; ".join(r.failed or r.passed),
            },
        )

    def _new(self, r: _Report) -> None:
        pair = r.pair("new_loss")
        if pair is None:
            return
        cand, base = pair
        improvement = -_rel(cand, base)
        r.check(
            "new_loss",
            improvement >= self.min_new_improvement,
            f"new-data loss {base:.4f} → {cand:.4f} ({improvement:+.1%} improvement,"
            f" need ≥ {self.min_new_improvement:.1%})",
        )

    def _loss(self, r: _Report, key: str, label: str, limit: float) -> None:
        if not self._needed(key) and _num(r.baseline, key) is None:
            if r.candidate_not_finite(key):
                return
            why = "nothing learned yet" if key == "retention_loss" else "no anchor set"
            r.passed.append(f"{label} loss: not measured ({why}), not compared")
            return
        pair = r.pair(key)
        if pair is None:
            return
        cand, base = pair
        change = _rel(cand, base)
        r.check(
            key,
            change <= limit,
            f"{label} loss {base:.4f} → {cand:.4f} ({change:+.1%}, allowed ≤ +{limit:.1%})",
        )

    def _evals(self, r: _Report) -> None:
        present = set(r.candidate) | set(r.baseline) | set(self.required)
        keys = sorted(k for k in present if k.startswith("eval:"))
        for key in keys:
            if not self._needed(key) and _num(r.baseline, key) is None:
                if not r.candidate_not_finite(key):
                    r.passed.append(f"{key}: new eval set, no baseline to compare")
                continue
            pair = r.pair(key)
            if pair is None:
                continue
            cand, base = pair
            drop = base - cand
            r.check(
                key,
                drop <= self.max_eval_drop_points,
                f"{key} {base:.1f} → {cand:.1f} points ({-drop:+.1f},"
                f" allowed drop ≤ {self.max_eval_drop_points:g})",
            )


@dataclass
class _Report:
    """The two metric dicts and the criteria found failing / passing so far."""

    candidate: dict[str, Any]
    baseline: dict[str, Any]
    failed: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    # metric -> how it failed: "regressed" (compared, beyond its threshold), "missing" or
    # "not_finite" (a broken evaluation); what a retry adapts its recipe to.
    failed_metrics: dict[str, str] = field(default_factory=dict)

    def check(self, key: str, ok: bool, text: str) -> None:
        (self.passed if ok else self.failed).append(text)
        if not ok:
            self.failed_metrics[key] = "regressed"

    def candidate_not_finite(self, key: str) -> bool:
        cand = _num(self.candidate, key)
        if cand is not None and not math.isfinite(cand):
            self.failed.append(
                f"{key}: candidate value {self.candidate.get(key)!r} is not a finite number"
            )
            self.failed_metrics[key] = "not_finite"
            return True
        return False

    def pair(self, key: str) -> tuple[float, float] | None:
        """Both values if comparable; otherwise records the failure and returns None."""
        cand, base = _num(self.candidate, key), _num(self.baseline, key)
        for who, value, metrics in (
            ("candidate", cand, self.candidate),
            ("baseline", base, self.baseline),
        ):
            if value is None:
                self.failed.append(f"{key}: missing from the {who}'s metrics")
                self.failed_metrics[key] = "missing"
                return None
            if not math.isfinite(value):
                self.failed.append(
                    f"{key}: {who} value {metrics.get(key)!r} is not a finite number"
                )
                self.failed_metrics[key] = "not_finite"
                return None
        assert cand is not None and base is not None
        return cand, base
