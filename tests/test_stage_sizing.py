"""A stage's length follows its data: exact step counts of the one sizing rule."""

from __future__ import annotations

import pytest

from daemon.config import TrainingConfig
from daemon.training import hparams, loop, sizing

OLD_RECIPE = {"passes": 0.0, "epochs": 8.0, "min_steps": 1000}  # before training.passes


def steps(data_tokens: int, micro: int = 0, **training: object) -> sizing.Sizing:
    hp = TrainingConfig(**training)  # type: ignore[arg-type]
    return sizing.size_stage(hp, data_tokens=data_tokens, micro_batches_per_epoch=micro)


@pytest.mark.parametrize(
    ("data_tokens", "micro", "training", "expected", "rule"),
    [
        # passes x tokens / (batch_tokens x grad_accum): 8 x 28,800 / 512 = 450
        (28_800, 169, {"passes": 8.0, "min_steps": 100}, 450, "passes"),
        (28_801, 169, {"passes": 8.0, "min_steps": 100}, 451, "passes"),  # rounds up
        # replay (in the micro-batch count) does not lengthen a passes-sized stage
        (28_800, 57, {"passes": 8.0, "min_steps": 100}, 450, "passes"),
        # synthetic text does: 3x the tokens, 3x the steps
        (86_400, 169, {"passes": 8.0, "min_steps": 100}, 1350, "passes"),
        (10_000, 0, {"passes": 2.0, "grad_accum": 4, "min_steps": 0}, 10, "passes"),
        (10_000, 0, {"passes": 2.0, "batch_tokens": 1024, "min_steps": 0}, 20, "passes"),
        # a small stage is raised to the floor, a large one capped
        (1_000, 2, {"passes": 8.0, "min_steps": 100}, 100, "min_steps"),
        (28_800, 169, {"passes": 8.0, "min_steps": 100, "max_steps": 300}, 300, "max_steps"),
        (0, 0, {"passes": 8.0, "min_steps": 0}, 1, "passes"),
        # passes = 0: the old rule, epochs over the packed micro-batches
        (28_800, 169, OLD_RECIPE, 1352, "epochs"),
        (28_800, 57, OLD_RECIPE, 1000, "min_steps"),
        (28_800, 57, {**OLD_RECIPE, "grad_accum": 2, "min_steps": 0}, 228, "epochs"),
    ],
)
def test_exact_step_counts(
    data_tokens: int, micro: int, training: dict[str, object], expected: int, rule: str
) -> None:
    got = steps(data_tokens, micro, **training)
    assert (got.steps, got.rule) == (expected, rule)
    assert got.reason.startswith(f"{expected:,} steps (")
    hp = TrainingConfig(**training)  # type: ignore[arg-type]
    assert loop.total_steps(hp, micro, data_tokens) == expected  # the stage's own count


def test_default_recipe_is_sized_by_its_data_with_a_small_floor() -> None:
    # the knowledge benchmark's real-text stage: 15 Debian Policy sections, ~6.3k tokens
    assert steps(6_144).steps == 96  # 8 passes x 6,144 / 512
    assert steps(6_144).rule == "passes"
    # the example, 28.8k new tokens: 450 steps (the old recipe took 1000)
    assert steps(28_800, 57).steps == 450
    assert steps(28_800, 57, **OLD_RECIPE).steps == 1000  # the old recipe, one config away
    # a handful of facts is raised to the floor
    assert steps(1_000, 2).steps == TrainingConfig().min_steps == 40
    assert steps(1_000, 2).rule == "min_steps"
    assert steps(512_000, 1000).steps == 8000


def test_plans_from_before_passes_are_sized_as_planned() -> None:
    old = hparams.from_plan({"epochs": 2.0})
    assert old.passes == 0 and old.min_steps == 0
    assert loop.total_steps(old, 10, 99_999) == 20
