"""A stage's ranks under torchrun: process group, data shard, and the few collectives.

``training.launcher = "torchrun"`` starts the stage as ``python -m torch.distributed.run
... --module daemon.training.stage``; each rank reads the same plan. Here, PyTorch's own
engine does the work (no home-made orchestration):

* the process group: gloo on CPU, nccl on GPU (each rank on ``cuda:LOCAL_RANK``);
* the model: ``DistributedDataParallel`` over the LoRA weights (gradients all-reduced);
* the data: optimizer step ``s`` takes global micro-batches ``s*A*W .. (s+1)*A*W - 1``
  (``A`` micro-batches per rank, ``W`` ranks) and rank ``r`` the ``r``-th run of ``A``
  of them. ``A = ceil(grad_accum / W)``, so a plan's ``grad_accum`` is the global number
  of micro-batches per step: with ``grad_accum`` a multiple of ``W`` a step is the same
  step as one process takes, just computed in parallel (and the stage is as long);
* the loss is summed per token over the global batch (label counts all-reduced), so the
  gradient does not depend on how the batch was split;
* only rank 0 writes: the store (progress, status), checkpoints and the adapter.

One process (no torchrun) is the same code with ``W = 1`` and no collectives.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

TIMEOUT_S = 300  # a collective waiting this long for a peer fails the stage


@dataclass
class Ranks:
    """This process's place in the stage: rank, world size, local rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def per_rank(self, grad_accum: int) -> int:
        """Micro-batches each rank runs per optimizer step."""
        return math.ceil(grad_accum / self.world)

    def micro_indices(self, step: int, grad_accum: int) -> list[int]:
        """The global micro-batch indices this rank trains at optimizer step ``step``."""
        a = self.per_rank(grad_accum)
        first = step * a * self.world + self.rank * a
        return list(range(first, first + a))

    def global_accum(self, grad_accum: int) -> int:
        """Micro-batches per optimizer step over all ranks (what the stage is sized by)."""
        return self.per_rank(grad_accum) * self.world

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (the values themselves with one process)."""
        if not self.active:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(t)
        return [float(x) for x in t.tolist()]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (e.g. a stop request)."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def wrap(self, model: Any) -> Any:
        """The module to run forward/backward through: DDP across ranks, else ``model``."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if _device().type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _device() -> Any:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def setup() -> Ranks:
    """Join the process group when torchrun started us (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)  # "cuda" now means this rank's GPU
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    return ranks
