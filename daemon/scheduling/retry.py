"""A retry that learns from its rejection: the next recipe follows what the gate flagged.

A rejected stage's data stays pending (``policy.on_reject = "retry"``); the stage that
retries it adapts the recipe to why the previous attempts were rejected, read from the
store (the track's rejected stages since its last promotion that trained these chunks,
and their gate verdicts), never from memory, so a restarted daemon plans the same retry:

* general-text drift (``general_loss`` regressed): half the learning rate, twice the
  general-text mix (0.25 when it was off), half the steps;
* retention regression (``retention_loss`` or a user eval set): half the learning rate,
  twice the replay budget;
* no new-data improvement: twice the steps;
* a broken evaluation (a metric missing or not finite): the same recipe.

Adjustments compound over consecutive rejections and start again from the configured
recipe after a promotion. After ``policy.max_retries`` retries the data is set aside
(:func:`daemon.scheduling.planning.after_reject`), with what was tried in its message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from daemon.config import Config, TrainingConfig
from daemon.config_sections import MAX_STEPS
from daemon.scheduling.spec import build_all
from store import stages
from store.contracts import GateVerdict

EVENT_KIND = "policy.retry_adapted"
LR_FACTOR = 0.5  # general drift or retention regression
GENERAL_MIX_FACTOR = 2.0  # general drift
GENERAL_MIX_START = 0.25  # general drift while general mixing was off
REPLAY_FACTOR = 2.0  # retention regression
FEWER_STEPS = 0.5  # general drift
MORE_STEPS = 2.0  # no new-data improvement
CAUSES = ("general", "retention", "new", "broken")
_PHRASE = {
    "general": "general drift",
    "retention": "retention regression",
    "new": "no new-data improvement",
    "broken": "a broken evaluation",
}
_TEXT_PREFIX = {
    "new-data loss": "new_loss",
    "retention loss": "retention_loss",
    "general loss": "general_loss",
}


@dataclass
class Rejection:
    """One rejected stage: why (causes, in :data:`CAUSES` order) and by how much."""

    stage_id: int
    causes: list[str]
    labels: list[str]
    retry: dict[str, Any] = field(default_factory=dict)  # its own plan's retry, if any

    def phrase(self) -> str:
        return " and ".join(_PHRASE[c] for c in self.causes) or "no stated cause"


def judge(cfg: Config, candidate: dict[str, Any], baseline: dict[str, Any]) -> GateVerdict:
    """The configured promotion policy's verdict on a candidate's metrics vs the baseline's."""
    decision = build_all(cfg).promotion.decide(candidate, baseline)
    return GateVerdict(
        promote=decision.fire,
        reasons=decision.reasons,
        failed=decision.data.get("failed", []),
        failed_metrics=decision.data.get("failed_metrics", {}),
        summary=decision.summary,
    )


def verdict_of(cfg: Config, row: dict[str, Any]) -> GateVerdict:
    """A rejected stage's verdict: as stored by ``after_reject``, else judged again from its
    stored metrics (a stage rejected by an older daemon)."""
    metrics = row.get("metrics") or {}
    if metrics.get("gate"):
        return GateVerdict.from_json(metrics["gate"])
    return judge(cfg, metrics.get("candidate") or {}, metrics.get("baseline") or {})


def _failed_metrics(v: GateVerdict) -> dict[str, str]:
    if v.failed_metrics:
        return dict(v.failed_metrics)
    out: dict[str, str] = {}  # a policy that gives only texts: read their prefixes
    for text in v.failed:
        key = next((k for p, k in _TEXT_PREFIX.items() if text.startswith(p)), "")
        if key:
            out[key] = "regressed"
        elif text.startswith("eval:") and text.endswith(")") and "points" in text:
            out[text.split(" ", 1)[0]] = "regressed"
        else:
            out[text.split(":", 1)[0]] = "missing"
    return out


def _rel(metrics: dict[str, Any], key: str) -> float | None:
    cand = (metrics.get("candidate") or {}).get(key)
    base = (metrics.get("baseline") or {}).get(key)
    if not isinstance(cand, int | float) or not isinstance(base, int | float) or not base:
        return None
    value = (cand - base) / abs(base)
    return value if math.isfinite(value) else None


def _label(cause: str, key: str, metrics: dict[str, Any]) -> str:
    if cause == "broken":
        return f"a broken evaluation ({key})"
    if key.startswith("eval:"):
        cand = (metrics.get("candidate") or {}).get(key)
        base = (metrics.get("baseline") or {}).get(key)
        if isinstance(cand, int | float) and isinstance(base, int | float):
            return f"{key} drop {base - cand:.1f} points"
        return f"{key} drop"
    rel = _rel(metrics, key)
    if rel is None:
        return _PHRASE[cause]
    if cause == "new":  # said as the improvement the gate measured
        return f"{_PHRASE[cause]} (only {-rel:+.1%})"
    return f"{_PHRASE[cause]} {rel:+.1%}"


def rejection(cfg: Config, row: dict[str, Any]) -> Rejection:
    """Why stage ``row`` was rejected, from its stored verdict and metrics."""
    found: dict[str, list[str]] = {}
    metrics = row.get("metrics") or {}
    for key, how in _failed_metrics(verdict_of(cfg, row)).items():
        if how != "regressed":
            cause = "broken"
        elif key == "general_loss":
            cause = "general"
        elif key == "retention_loss" or key.startswith("eval:"):
            cause = "retention"
        elif key == "new_loss":
            cause = "new"
        else:
            continue
        found.setdefault(cause, []).append(_label(cause, key, metrics))
    causes = [c for c in CAUSES if c in found]
    labels = [x for c in causes for x in found[c]]
    return Rejection(int(row["id"]), causes, labels, (row.get("plan") or {}).get("retry") or {})


def rejections(cfg: Config, db: sqlite_utils.Database, chunk_ids: list[int]) -> list[Rejection]:
    """The track's rejected stages since its last promotion whose new data overlaps
    ``chunk_ids``, oldest first."""
    wanted = {int(i) for i in chunk_ids}
    return [
        rejection(cfg, row)
        for row in stages.rejected_since_promotion(db, cfg.track)
        if wanted.intersection(int(i) for i in (row.get("plan") or {}).get("new_chunk_ids", []))
    ]


@dataclass
class Adjustment:
    """The recipe of a stage whose data was rejected before (``attempt`` ≥ 1), or the
    configured one unchanged (``attempt`` = 0)."""

    training: TrainingConfig
    attempt: int = 0
    max_retries: int = 0
    replay_factor: float = 1.0
    history: list[Rejection] = field(default_factory=list)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def tried(self) -> str:
        """``learning_rate 4e-3 -> 2e-3, general_mix 0.25 -> 0.5`` (or 'recipe unchanged')."""
        parts = [f"{k} {fmt(a)} -> {fmt(b)}" for k, (a, b) in self.changes.items()]
        if self.replay_factor != 1.0:
            parts.append(f"replay budget x{fmt(self.replay_factor)}")
        return ", ".join(parts) or "recipe unchanged"

    def reason(self) -> str:
        """``retry 1 of 2 after general drift +8.0%: learning_rate 4e-3 -> 2e-3, ...``."""
        if not self.attempt:
            return ""
        after = "; ".join(", ".join(r.labels) or r.phrase() for r in self.history)
        of = f" of {self.max_retries}" if self.attempt <= self.max_retries else ""
        return f"retry {self.attempt}{of} after {after}: {self.tried()}"

    def to_plan(self) -> dict[str, Any]:
        """What the plan records in ``retry`` ({} when this is not a retry)."""
        if not self.attempt:
            return {}
        return {
            "attempt": self.attempt,
            "max_retries": self.max_retries,
            "after_stages": [r.stage_id for r in self.history],
            "causes": [r.causes for r in self.history],
            "changes": {k: [a, b] for k, (a, b) in self.changes.items()},
            "replay_factor": self.replay_factor,
            "tried": self.tried(),
            "reason": self.reason(),
        }


def fmt(value: Any) -> str:
    """4e-3 for small floats, 0.25 / 8 otherwise."""
    if isinstance(value, float) and 0 < abs(value) < 0.01:
        mant, exp = f"{value:.2e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


STEP_KEYS = ("passes", "epochs", "min_steps")


def _apply(knobs: dict[str, float], causes: list[str]) -> None:
    """One rejection's adjustment, on top of the earlier ones."""
    if "general" in causes or "retention" in causes:
        knobs["learning_rate"] *= LR_FACTOR
    if "general" in causes:
        knobs["general_mix"] = knobs["general_mix"] * GENERAL_MIX_FACTOR or GENERAL_MIX_START
        knobs["steps"] *= FEWER_STEPS
    if "retention" in causes:
        knobs["replay"] *= REPLAY_FACTOR
    if "new" in causes:
        knobs["steps"] *= MORE_STEPS


def _adjusted(base: TrainingConfig, knobs: dict[str, float]) -> TrainingConfig:
    """``base`` with ``knobs`` applied, inside the config's own ranges."""
    update: dict[str, Any] = {
        "learning_rate": max(1e-7, knobs["learning_rate"]),
        "general_mix": min(100.0, knobs["general_mix"]),
    }
    scale = knobs["steps"]
    if base.passes > 0:
        update["passes"] = min(10_000.0, base.passes * scale)
    else:
        update["epochs"] = min(1000.0, max(0.01, base.epochs * scale))
    update["min_steps"] = min(MAX_STEPS, round(base.min_steps * scale))
    return TrainingConfig(**{**base.model_dump(), **update})


def adjustment(cfg: Config, db: sqlite_utils.Database, chunk_ids: list[int]) -> Adjustment:
    """The recipe for a stage training ``chunk_ids``: the configured one, adapted to every
    rejection of these chunks since the track's last promotion (see the module doc)."""
    base = cfg.training
    history = rejections(cfg, db, chunk_ids) if cfg.policy.on_reject == "retry" else []
    if not history:
        return Adjustment(base)
    knobs = {"learning_rate": base.learning_rate, "general_mix": base.general_mix}
    knobs.update(steps=1.0, replay=1.0)
    for r in history:
        _apply(knobs, r.causes)
    training = _adjusted(base, knobs)
    keys = ("learning_rate", "general_mix", *STEP_KEYS)
    changes = {
        k: (getattr(base, k), getattr(training, k))
        for k in keys
        if getattr(base, k) != getattr(training, k)
    }
    return Adjustment(
        training,
        attempt=len(history),
        max_retries=cfg.policy.max_retries,
        replay_factor=knobs["replay"],
        history=history,
        changes=changes,
    )


def summary(history: list[Rejection]) -> str:
    """``general drift each time`` or ``general drift, then retention regression``."""
    phrases = [r.phrase() for r in history]
    if len(phrases) > 1 and len(set(phrases)) == 1:
        return f"{phrases[0]} each time"
    return ", then ".join(phrases)
