"""Placement: which cores, threads, niceness and GPUs serving and training get (torch-free).

Without a split, vLLM's OpenMP threads and the stage's torch threads each spin on every
core, and both collapse (measured 10-23x slower, not 2x). :func:`compute` divides the
machine by ``[placement]``: on CPU the managed vLLM gets ``serving_share`` of the cores
(its OpenMP threads bound there through ``VLLM_CPU_OMP_THREADS_BIND``, its processes
pinned there) and stages and scorers get the others (affinity, ``OMP_NUM_THREADS`` per
rank, niceness ``training_nice``); with one core they share it and niceness decides. On
one GPU both share it and vLLM takes 0.45 of its memory; with several, vLLM gets the
first ``serving_share`` of them and training the rest. Nothing is divided when nothing is
served on this machine (``serving.mode`` external or none): training gets everything.

The parent passes the split to its children in their environment (:meth:`training_env`,
:meth:`serving_env`); a stage or scorer applies its part first thing
(:func:`apply_from_env`: affinity and niceness, before torch starts its threads).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config import Config
from daemon.config_placement import PlacementConfig

CPUS_ENV = "EVERGREEN_CPUS"  # cores a stage/scorer pins itself to ("0-3,8")
NICE_ENV = "EVERGREEN_NICE"  # niceness a stage/scorer raises itself to
SHARED_GPU_MEMORY = 0.45  # vLLM's share of a GPU that training also uses
DEDICATED_GPU_MEMORY = 0.9  # vLLM's share of GPUs of its own


@dataclass(frozen=True)
class Machine:
    """What placement divides: the cores this process may use and the visible GPUs."""

    cpus: tuple[int, ...]
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    """The split. Empty CPU tuples and None GPUs mean "not restricted"."""

    enabled: bool
    serving_cpus: tuple[int, ...] = ()
    training_cpus: tuple[int, ...] = ()
    training_nice: int = 0
    serving_gpus: str | None = None
    training_gpus: str | None = None
    gpu_memory_utilization: float = 0.0
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def training_threads(self, nproc: int = 1) -> int:
        """torch/OpenMP threads of each of ``nproc`` training processes (0 = unset)."""
        if not self.training_cpus:
            return 0
        return max(1, len(self.training_cpus) // max(1, nproc))

    def training_env(self, nproc: int = 1) -> dict[str, str]:
        """Environment for stage and scorer processes (``nproc`` ranks share the cores)."""
        if not self.enabled:
            return {}
        env: dict[str, str] = {}
        threads = self.training_threads(nproc)
        if threads:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[name] = str(threads)
            env[CPUS_ENV] = format_cpus(self.training_cpus)
        if self.training_nice:
            env[NICE_ENV] = str(self.training_nice)
        if self.training_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.training_gpus
        return env

    def serving_env(self) -> dict[str, str]:
        """Environment for the managed vLLM: its OpenMP threads bound to its cores."""
        if not self.enabled:
            return {}
        env: dict[str, str] = {}
        if self.serving_cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = format_cpus(self.serving_cpus)
            env["OMP_NUM_THREADS"] = str(len(self.serving_cpus))
        if self.serving_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.serving_gpus
        return env

    def serving_args(self, extra_args: list[str]) -> list[str]:
        """vLLM arguments (the GPU memory share), unless ``extra_args`` already set them."""
        if not self.enabled or not self.gpu_memory_utilization:
            return []
        if any(str(a).startswith("--gpu-memory-utilization") for a in extra_args):
            return []
        return ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]

    def describe(self) -> str:
        """One line for logs and ``config show``."""
        if not self.enabled:
            return "placement off: serving and training share every core and GPU"
        parts = [
            f"serving cpus {format_cpus(self.serving_cpus) or 'all'}",
            f"training cpus {format_cpus(self.training_cpus) or 'all'}"
            f" ({self.training_threads() or 'default'} threads, nice {self.training_nice})",
        ]
        if self.serving_gpus is not None or self.training_gpus is not None:
            parts.append(
                f"serving gpus {self.serving_gpus} (memory {self.gpu_memory_utilization:g}),"
                f" training gpus {self.training_gpus}"
            )
        return "placement: " + "; ".join(parts) + (f" [{'; '.join(self.reasons)}]")


def parse_cpus(text: str) -> tuple[int, ...]:
    """``'0-3,8'`` -> (0, 1, 2, 3, 8)."""
    out: list[int] = []
    for part in filter(None, text.replace(" ", "").split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(set(out)))


def format_cpus(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 8) -> ``'0-3,8'``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c != run[-1] + 1:
            out.append(_run(run))
            run = []
        run.append(c)
    if run:
        out.append(_run(run))
    return ",".join(out)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def probe() -> Machine:
    """This machine, without torch: our CPU affinity and the NVIDIA GPUs we may see."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = tuple(g for g in visible.split(",") if g.strip() and g.strip() != "-1")
    else:
        root = Path("/proc/driver/nvidia/gpus")
        n = len(list(root.iterdir())) if root.is_dir() else 0
        gpus = tuple(str(i) for i in range(n))
    return Machine(cpus, gpus)


def compute(pc: PlacementConfig, machine: Machine, *, serving_here: bool) -> Placement:
    """The split of ``machine`` by ``pc``; ``serving_here`` = a managed vLLM runs here."""
    if not pc.enabled:
        return Placement(False, reasons=("placement.enabled = false",))
    cpus, gpus = machine.cpus, machine.gpus
    if not serving_here:
        why = "nothing served on this machine: training gets it all"
        return Placement(
            True, (), _explicit(pc.training_cpus, cpus), pc.training_nice, reasons=(why,)
        )
    s_cpus, t_cpus, why_cpu = _split_cpus(pc, cpus)
    s_gpus, t_gpus, mem, why_gpu = _split_gpus(pc, gpus)
    return Placement(
        True, s_cpus, t_cpus, pc.training_nice, s_gpus, t_gpus, mem, (why_cpu, *why_gpu)
    )


def _explicit(text: str, cpus: tuple[int, ...]) -> tuple[int, ...]:
    return parse_cpus(text) if text else cpus


def _split_cpus(
    pc: PlacementConfig, cpus: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    if pc.serving_cpus or pc.training_cpus:
        s = parse_cpus(pc.serving_cpus) if pc.serving_cpus else ()
        t = parse_cpus(pc.training_cpus) if pc.training_cpus else ()
        s = s or tuple(c for c in cpus if c not in t) or cpus
        t = t or tuple(c for c in cpus if c not in s) or cpus
        return s, t, "cores from placement.serving_cpus/training_cpus"
    if len(cpus) < 2:
        return cpus, cpus, f"{len(cpus)} core: shared, training at nice {pc.training_nice}"
    k = min(len(cpus) - 1, max(1, round(len(cpus) * pc.serving_share)))
    return cpus[:k], cpus[k:], f"{len(cpus)} cores: {k} for serving, {len(cpus) - k} training"


def _split_gpus(
    pc: PlacementConfig, gpus: tuple[str, ...]
) -> tuple[str | None, str | None, float, tuple[str, ...]]:
    if pc.serving_gpus or pc.training_gpus:
        s = pc.serving_gpus or None
        t = pc.training_gpus or None
        shared = s is None or t is None or bool(set(s.split(",")) & set(t.split(",")))
        mem = pc.gpu_memory_utilization or (SHARED_GPU_MEMORY if shared else DEDICATED_GPU_MEMORY)
        return s, t, mem, ("GPUs from placement.serving_gpus/training_gpus",)
    if not gpus:
        return None, None, 0.0, ()
    if len(gpus) == 1:
        mem = pc.gpu_memory_utilization or SHARED_GPU_MEMORY
        return gpus[0], gpus[0], mem, (f"1 GPU shared: vLLM takes {mem:g} of its memory",)
    k = min(len(gpus) - 1, max(1, math.floor(len(gpus) * pc.serving_share)))
    mem = pc.gpu_memory_utilization or DEDICATED_GPU_MEMORY
    why = f"{len(gpus)} GPUs: {k} for serving, {len(gpus) - k} training"
    return ",".join(gpus[:k]), ",".join(gpus[k:]), mem, (why,)


def for_config(cfg: Config, machine: Machine | None = None) -> Placement:
    """The placement the daemon uses for ``cfg`` on this machine."""
    return compute(cfg.placement, machine or probe(), serving_here=cfg.serving.mode == "managed")


def apply_from_env() -> str:
    """In a stage or scorer process, before torch starts threads: pin this process to
    ``$EVERGREEN_CPUS`` and raise its niceness to ``$EVERGREEN_NICE``. Returns what it did."""
    done = []
    cpus = parse_cpus(os.environ.get(CPUS_ENV, ""))
    if cpus:
        with contextlib.suppress(OSError):  # cores gone (cgroup changed): keep ours
            os.sched_setaffinity(0, cpus)
            done.append(f"cpus {format_cpus(cpus)}")
    nice = int(os.environ.get(NICE_ENV, "0") or 0)
    if nice:
        current = os.nice(0)
        if nice > current:
            os.nice(nice - current)
        done.append(f"nice {os.nice(0)}")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and done:
        done.append(f"{threads} threads")
    return ", ".join(done) or "unplaced"
