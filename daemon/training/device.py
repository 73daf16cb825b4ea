"""One place that decides where training runs: cuda+bf16 when available, else cpu+fp32.

Every torch entry point (seed build, stage, evaluation, scoring) calls :func:`pick` so
they agree on device and dtype; mixing them is how adapters end up subtly different.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.device.type}+{str(self.dtype).removeprefix('torch.')}"


def pick() -> Device:
    """cuda with bf16 (when the GPU supports it, else fp32); otherwise cpu with fp32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return Device(torch.device("cuda"), dtype)
    return Device(torch.device("cpu"), torch.float32)
