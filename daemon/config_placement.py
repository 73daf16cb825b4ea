"""The ``[placement]`` config section: how serving and training share one machine.

Empty values mean "computed from this machine" (:mod:`daemon.scheduling.placement`
computes them; ``evergreen config show`` prints what it chose). The keys only say how to
divide the box; applying the split is the workers' job (the stage and scorer processes
set their own affinity, threads and niceness; the managed vLLM gets its thread binding
and GPU memory share in its environment and command line).
"""

from __future__ import annotations

import re

from pydantic import field_validator

from daemon.config_sections import Section, num, opt

_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_GPU_LIST = re.compile(r"^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$")


class PlacementConfig(Section):
    enabled: bool = opt(
        True,
        "Divide the machine between the managed vLLM and training (CPU cores, threads, "
        "niceness, GPUs). false = every process sees the whole machine (threads spin on "
        "every core: measured 10-23x slower when both run).",
    )
    serving_share: float = num(
        0.5,
        0.05,
        0.95,
        "Share of the CPU cores (or GPUs, with 2 or more) given to the managed vLLM when "
        "serving_cpus / serving_gpus are empty; training gets the rest (at least one).",
    )
    serving_cpus: str = opt(
        "", "CPU cores of the managed vLLM, e.g. '0-3,8' (empty = from serving_share)."
    )
    training_cpus: str = opt(
        "",
        "CPU cores of stage and scorer processes (empty = the cores vLLM does not get; all "
        "cores when nothing is served here).",
    )
    training_nice: int = num(
        10, 0, 19, "Niceness of stage and scorer processes (serving wins a contested core)."
    )
    serving_gpus: str = opt(
        "",
        "CUDA_VISIBLE_DEVICES of the managed vLLM (empty = GPU 0 on a shared GPU, the "
        "first serving_share of the GPUs when there are several).",
    )
    training_gpus: str = opt(
        "",
        "CUDA_VISIBLE_DEVICES of stages (empty = the shared GPU, or the GPUs vLLM does not get).",
    )
    gpu_memory_utilization: float = num(
        0.0,
        0.0,
        0.99,
        "vLLM --gpu-memory-utilization (0 = 0.45 on a GPU shared with training, 0.9 on "
        "dedicated GPUs). Ignored without a GPU or when serving.extra_args sets it.",
    )

    @field_validator("serving_cpus", "training_cpus")
    @classmethod
    def _cpus(cls, value: str) -> str:
        value = value.replace(" ", "")
        if value and not _CPU_LIST.match(value):
            raise ValueError(f"must be a CPU list like '0-3,8', got {value!r}")
        return value

    @field_validator("serving_gpus", "training_gpus")
    @classmethod
    def _gpus(cls, value: str) -> str:
        value = value.replace(" ", "")
        if value and not _GPU_LIST.match(value):
            raise ValueError(f"must be a device list like '0,1', got {value!r}")
        return value
