"""A stage's hyper-parameters: the plan's ``hparams`` dict read back into a ``TrainingConfig``.

The training recipe has one home, :class:`daemon.config.TrainingConfig`; the planner
stores it in the plan as a plain dict (the training section at planning time) and the
stage reads it back here. This is the only place that knows how a ``TrainingConfig`` is
built from such a dict, so a change to how config models are declared touches these
functions, not the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from daemon.config import TrainingConfig

# Keys added to the recipe after plans were first stored, with the value their absence
# meant then: a plan written before ``min_steps`` existed resumes as it was planned (no
# minimum), not with today's default of 1000 steps.
# Likewise ``passes``: an older plan is sized by ``epochs``, as it was planned.
ABSENT_IN_OLD_PLANS: dict[str, Any] = {"min_steps": 0, "passes": 0.0}


def field_names() -> frozenset[str]:
    """The settings ``TrainingConfig`` declares."""
    return frozenset(TrainingConfig.model_fields)


def from_plan(raw: Mapping[str, Any]) -> TrainingConfig:
    """The recipe of a stored plan; unknown keys (from another daemon version) are dropped,
    missing ones take their defaults (see :data:`ABSENT_IN_OLD_PLANS`)."""
    names = field_names()
    known = {k: v for k, v in raw.items() if k in names}
    for key, value in ABSENT_IN_OLD_PLANS.items():
        known.setdefault(key, value)
    return TrainingConfig(**known)


def to_plan(training: TrainingConfig) -> dict[str, Any]:
    """The recipe as the plain dict a plan stores (the inverse of :func:`from_plan`)."""
    return training.model_dump(mode="json")
