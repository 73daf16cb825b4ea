"""Where the model computes, and in what dtype: one decision for training and serving.

:func:`placement` maps what a device query found (an :class:`Accelerator`) to the
trainer's device and dtype; :func:`serving_dtype` maps it to the managed vLLM's
``--dtype``. Both are pure, so tests fake the query. This module never imports torch:
the daemon asks ``nvidia-smi`` (:func:`query_nvidia_smi`), the torch processes ask torch
(:func:`daemon.training.device.pick`), and both land on the same table:

| accelerator            | trainer         | managed vLLM |
| ---------------------- | --------------- | ------------ |
| CUDA GPU with bf16     | cuda, bfloat16  | bfloat16     |
| CUDA GPU without bf16  | cuda, float32   | float16      |
| none                   | cpu, float32    | float32      |

vLLM's own ``auto`` would downcast a float32 checkpoint to bfloat16 even on a CPU, so
the served model would not be the one the adapter was trained on; we pass the dtype.
A GPU without bf16 (compute capability < 8.0) trains in float32 (fp16 training needs
loss scaling) but serves in float16 (vLLM's fast kernels have no float32 path).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

BF16_MIN_CAPABILITY = 8.0  # Ampere and later
NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Accelerator:
    """What a device query found: a CUDA GPU (and whether it computes in bf16) or none."""

    cuda: bool
    bf16: bool = False
    name: str = ""


@dataclass(frozen=True)
class Placement:
    """The trainer's device (``cuda``/``cpu``) and dtype (a torch dtype's name)."""

    device: str
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.device}+{self.dtype}"


CPU = Accelerator(cuda=False)


def placement(acc: Accelerator) -> Placement:
    """cuda+bf16 on a GPU that has bf16, cuda+fp32 on one that does not, else cpu+fp32."""
    if acc.cuda:
        return Placement("cuda", "bfloat16" if acc.bf16 else "float32")
    return Placement("cpu", "float32")


def serving_dtype(acc: Accelerator) -> str:
    """The managed vLLM's ``--dtype``: the training dtype where vLLM computes in it."""
    if acc.cuda:
        return "bfloat16" if acc.bf16 else "float16"
    return "float32"


Runner = Callable[[list[str]], str]


def _run_nvidia_smi(args: list[str]) -> str:
    proc = subprocess.run(
        ["nvidia-smi", *args],
        capture_output=True,
        text=True,
        timeout=NVIDIA_SMI_TIMEOUT_S,
        check=True,
    )
    return proc.stdout


def query_nvidia_smi(run: Runner = _run_nvidia_smi, visible: str | None = None) -> Accelerator:
    """The GPU a CUDA process started with our environment would use first, without torch.

    ``visible`` is ``$CUDA_VISIBLE_DEVICES`` (read from the environment when None): empty
    or ``-1`` hides every GPU; otherwise its first entry (an index or a UUID) picks the
    GPU (an id nvidia-smi does not list, such as a MIG instance's, counts as the first
    GPU). No ``nvidia-smi``, or one that fails, means no GPU.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    first = visible.split(",")[0].strip() if visible is not None else None
    if first is not None and first in ("", "-1"):
        return CPU
    try:
        out = run(["--query-gpu=index,uuid,name,compute_cap", "--format=csv,noheader"])
    except (OSError, subprocess.SubprocessError):
        return CPU
    rows = [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]
    rows = [r for r in rows if len(r) == 4]
    if first is not None:
        chosen = [r for r in rows if first in (r[0], r[1]) or r[1].startswith(first)]
        # A MIG instance ("MIG-...") is not listed: it has its parent's capabilities,
        # and one box's GPUs are alike. An index that is not there hides every GPU.
        rows = chosen or ([] if first.isdigit() else rows[:1])
    if not rows:
        return CPU
    _, _, name, cap = rows[0]
    try:
        bf16 = float(cap) >= BF16_MIN_CAPABILITY
    except ValueError:
        bf16 = False
    return Accelerator(cuda=True, bf16=bf16, name=name)
