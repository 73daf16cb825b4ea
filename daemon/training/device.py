"""One place that decides where training runs: cuda+bf16 when available, else cpu+fp32.

Every torch entry point (seed build, stage, evaluation, scoring) calls :func:`pick` so
they agree on device and dtype; mixing them is how adapters end up subtly different.
The decision itself is :func:`daemon.devices.placement` (shared with the managed vLLM's
dtype); this module only asks torch what is there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from daemon.devices import Accelerator, placement


@dataclass(frozen=True)
class Device:
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.device.type}+{str(self.dtype).removeprefix('torch.')}"


def torch_query() -> Accelerator:
    """What torch sees: a CUDA device (and whether it has bf16), or none."""
    if torch.cuda.is_available():
        return Accelerator(
            cuda=True,
            bf16=torch.cuda.is_bf16_supported(),
            name=torch.cuda.get_device_name(0),
        )
    return Accelerator(cuda=False)


def pick(query: Callable[[], Accelerator] = torch_query) -> Device:
    """cuda with bf16 (when the GPU supports it, else fp32); otherwise cpu with fp32."""
    chosen = placement(query())
    return Device(torch.device(chosen.device), getattr(torch, chosen.dtype))
