"""A stage's hyper-parameters: the plan's ``hparams`` dict read back into a ``TrainingConfig``.

The training recipe has one home, :class:`daemon.config.TrainingConfig`; the planner
stores it in the plan as a plain dict (the training section at planning time) and the
stage reads it back here. This is the only place that knows how a ``TrainingConfig`` is
built from such a dict, so a change to how config models are declared touches these
functions, not the trainer. They work with ``TrainingConfig`` as a dataclass (today) and
as a pydantic model (``model_fields``/``model_dump``), so either can be merged in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

from daemon.config import TrainingConfig

# Keys added to the recipe after plans were first stored, with the value their absence
# meant then: a plan written before ``min_steps`` existed resumes as it was planned (no
# minimum), not with today's default of 1000 steps.
ABSENT_IN_OLD_PLANS: dict[str, Any] = {"min_steps": 0}


def field_names() -> frozenset[str]:
    """The settings ``TrainingConfig`` declares (pydantic model fields or dataclass fields)."""
    model_fields = getattr(TrainingConfig, "model_fields", None)
    if model_fields is not None:
        return frozenset(model_fields)
    return frozenset(f.name for f in dataclasses.fields(cast(Any, TrainingConfig)))


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
    dump = getattr(training, "model_dump", None)
    if dump is not None:
        return dict(dump(mode="json"))
    return dataclasses.asdict(cast(Any, training))
