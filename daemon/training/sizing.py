"""How many optimizer steps a stage takes: one rule, used by the stage and by benchmarks.

The length follows the data. With ``passes > 0`` (the default) a stage trains
``passes × (new + synthetic tokens)`` tokens: ``ceil(passes × tokens / (batch_tokens ×
grad_accum))`` steps. Replay rows share those steps (they displace repetitions of the new
data, as the continual benchmark found costs nothing), and general-text rows ride along
in each micro-batch, so neither lengthens the stage. With ``passes = 0`` the older rule
applies: ``epochs`` passes over the packed micro-batches (new + synthetic + replay).
Either way ``min_steps`` is the floor (a handful of steps teaches nothing) and
``max_steps`` the cap (0 = none). ``passes = 0, epochs = 8, min_steps = 1000`` is the
recipe before this rule existed.

Torch-free and pure, so the planner can say up front how long a stage will be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from daemon.config import TrainingConfig


@dataclass(frozen=True)
class Sizing:
    """The step count and the rule that set it (``passes``, ``epochs``, ``min_steps`` or
    ``max_steps``), with a sentence for the plan's reasons."""

    steps: int
    rule: str
    reason: str


def size_stage(hp: TrainingConfig, *, data_tokens: int, micro_batches_per_epoch: int) -> Sizing:
    """Steps for a stage of ``data_tokens`` new + synthetic tokens packed into
    ``micro_batches_per_epoch`` micro-batches (new + synthetic + replay) per epoch."""
    per_step = hp.batch_tokens * hp.grad_accum
    if hp.passes > 0:
        steps = math.ceil(hp.passes * max(0, data_tokens) / per_step)
        rule, why = "passes", f"{hp.passes:g} passes over {data_tokens:,} new+synthetic tokens"
    else:
        steps = math.ceil(hp.epochs * max(0, micro_batches_per_epoch) / hp.grad_accum)
        rule = "epochs"
        why = f"{hp.epochs:g} epochs of {micro_batches_per_epoch:,} micro-batches"
    sized = max(1, steps)
    if hp.min_steps > sized:
        sized, rule = hp.min_steps, "min_steps"
        why += f" = {steps:,} steps, raised to min_steps"
    if hp.max_steps and sized > hp.max_steps:
        sized, rule = hp.max_steps, "max_steps"
        why += f" = {steps:,} steps, capped at max_steps"
    return Sizing(sized, rule, f"{sized:,} steps ({why})")


def stage_steps(hp: TrainingConfig, *, data_tokens: int, micro_batches_per_epoch: int) -> int:
    """Just the step count of :func:`size_stage`."""
    return size_stage(
        hp, data_tokens=data_tokens, micro_batches_per_epoch=micro_batches_per_epoch
    ).steps
