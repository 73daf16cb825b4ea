"""The managed vLLM's ``--dtype``: the dtype the stages train in, where vLLM computes in it.

The decision is :func:`daemon.devices.serving_dtype` (bfloat16 on a GPU with bf16, float16
on an older GPU, float32 on CPU); the device query is ``nvidia-smi`` (this process never
imports torch), faked in tests. ``serving.dtype`` other than ``auto`` is used as given,
and a ``--dtype`` in ``serving.extra_args`` wins over both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from daemon.config_sections import ServingConfig
from daemon.devices import Accelerator, query_nvidia_smi, serving_dtype


def dtype_args(
    sc: ServingConfig,
    env: Mapping[str, str] | None = None,
    query: Callable[[str | None], Accelerator] | None = None,
) -> list[str]:
    """``["--dtype", NAME]`` for the managed vLLM, or ``[]`` when ``extra_args`` sets it.

    ``env`` is the child's environment (its ``CUDA_VISIBLE_DEVICES`` picks the GPU that is
    asked about); ``query`` maps that value to an :class:`Accelerator`.
    """
    if any(str(a) == "--dtype" or str(a).startswith("--dtype=") for a in sc.extra_args):
        return []
    if sc.dtype != "auto":
        return ["--dtype", sc.dtype]
    ask = query or (lambda visible: query_nvidia_smi(visible=visible))
    visible = (env or {}).get("CUDA_VISIBLE_DEVICES")
    return ["--dtype", serving_dtype(ask(visible))]
