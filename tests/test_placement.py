"""Placement: the core/GPU split computed from (faked) machines, and where it is applied."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config as config_mod
from daemon.config import ConfigError
from daemon.config_placement import PlacementConfig
from daemon.scheduling import placement
from daemon.scheduling.placement import Machine, compute, format_cpus, parse_cpus


def _pc(**kw: object) -> PlacementConfig:
    return PlacementConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ncpu", "serving", "training"),
    [
        (1, (0,), (0,)),
        (2, (0,), (1,)),
        (4, (0, 1), (2, 3)),
        (3, (0, 1), (2,)),
        (16, tuple(range(8)), tuple(range(8, 16))),
    ],
)
def test_cpu_split_by_core_count(ncpu: int, serving: tuple, training: tuple) -> None:
    p = compute(_pc(), Machine(tuple(range(ncpu))), serving_here=True)
    assert (p.serving_cpus, p.training_cpus) == (serving, training)
    assert p.training_threads() == len(training)
    env = p.training_env()
    assert env["OMP_NUM_THREADS"] == str(len(training))
    assert env[placement.CPUS_ENV] == format_cpus(training)
    assert env[placement.NICE_ENV] == "10"
    assert p.serving_env()["VLLM_CPU_OMP_THREADS_BIND"] == format_cpus(serving)
    assert "CUDA_VISIBLE_DEVICES" not in env and p.serving_args([]) == []


def test_share_and_explicit_lists_and_ranks() -> None:
    cpus = Machine(tuple(range(8)))
    p = compute(_pc(serving_share=0.25), cpus, serving_here=True)
    assert p.serving_cpus == (0, 1) and p.training_cpus == tuple(range(2, 8))
    assert p.training_threads(nproc=2) == 3  # two ranks share the training cores
    assert p.training_env(nproc=2)["OMP_NUM_THREADS"] == "3"
    p = compute(_pc(serving_cpus="4-7"), cpus, serving_here=True)
    assert p.serving_cpus == (4, 5, 6, 7) and p.training_cpus == (0, 1, 2, 3)
    # an affinity mask that is not 0..n-1 (a cgroup cpuset) is split as it is
    p = compute(_pc(), Machine((2, 3, 6, 7)), serving_here=True)
    assert p.serving_cpus == (2, 3) and p.training_cpus == (6, 7)


def test_nothing_served_here_gives_training_everything_and_off_sets_nothing() -> None:
    p = compute(_pc(), Machine((0, 1)), serving_here=False)
    assert p.serving_cpus == () and p.training_cpus == (0, 1)
    off = compute(_pc(enabled=False), Machine((0, 1), ("0",)), serving_here=True)
    assert off.training_env() == {} and off.serving_env() == {} and off.serving_args([]) == []
    assert "off" in off.describe()


def test_gpu_split_shared_and_dedicated() -> None:
    one = compute(_pc(), Machine((0, 1, 2, 3), ("0",)), serving_here=True)
    assert one.serving_gpus == one.training_gpus == "0"
    assert one.serving_args([]) == ["--gpu-memory-utilization", "0.45"]
    assert one.training_env()["CUDA_VISIBLE_DEVICES"] == "0"
    assert one.serving_env()["CUDA_VISIBLE_DEVICES"] == "0"
    eight = compute(_pc(), Machine((0, 1), tuple(map(str, range(8)))), serving_here=True)
    assert eight.serving_gpus == "0,1,2,3" and eight.training_gpus == "4,5,6,7"
    assert eight.serving_args([]) == ["--gpu-memory-utilization", "0.9"]
    # the user's own flag wins; an explicit share too
    assert eight.serving_args(["--gpu-memory-utilization=0.5"]) == []
    mine = compute(_pc(gpu_memory_utilization=0.3), Machine((0,), ("0",)), serving_here=True)
    assert mine.serving_args([]) == ["--gpu-memory-utilization", "0.3"]
    assert "1 GPU shared" in mine.describe()


def test_cpu_lists_parse_and_bad_keys_are_one_line_errors() -> None:
    assert parse_cpus("0-3,8") == (0, 1, 2, 3, 8) and format_cpus((0, 1, 2, 3, 8)) == "0-3,8"
    with pytest.raises(ConfigError, match=r"placement\.serving_cpus"):
        config_mod.from_dict({"placement": {"serving_cpus": "zero"}})
    with pytest.raises(ConfigError, match=r"placement\.training_nice"):
        config_mod.from_dict({"placement": {"training_nice": 40}})
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        config_mod.from_dict({"training": {"nnodes": 2}})


def test_child_applies_its_cores_and_niceness(tmp_path: Path) -> None:
    """What a stage or scorer does first: pin itself and lower its priority."""
    mine = sorted(os.sched_getaffinity(0))
    env = {**os.environ, placement.CPUS_ENV: str(mine[-1]), placement.NICE_ENV: "7"}
    code = (
        "import os; from daemon.scheduling import placement as p; print(p.apply_from_env());"
        "print(sorted(os.sched_getaffinity(0)), os.nice(0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[1] == f"[{mine[-1]}] {max(7, os.nice(0))}"


def test_stage_and_vllm_environments_carry_the_split(tmp_path: Path) -> None:
    from daemon.serving.vllm import ManagedVLLM
    from daemon.training import spawn

    cfg = config_mod.from_dict({"state_dir": str(tmp_path)})
    want = placement.for_config(cfg)
    env = spawn.subprocess_env(cfg)
    for key, value in want.training_env().items():
        assert env[key] == value
    venv = ManagedVLLM(cfg).environment()
    for key, value in want.serving_env().items():
        assert venv[key] == value
    if len(os.sched_getaffinity(0)) >= 2:
        assert venv["VLLM_CPU_OMP_THREADS_BIND"] != env[placement.CPUS_ENV]
    off = config_mod.from_dict({"state_dir": str(tmp_path), "placement": {"enabled": False}})
    assert placement.CPUS_ENV not in spawn.subprocess_env(off)
    got = ManagedVLLM(off).environment().get("VLLM_CPU_OMP_THREADS_BIND")
    assert got == os.environ.get("VLLM_CPU_OMP_THREADS_BIND")  # ours, untouched


def test_torchrun_command_and_no_warm_process(tmp_path: Path) -> None:
    from daemon.training import spawn

    cfg = config_mod.from_dict(
        {"state_dir": str(tmp_path), "training": {"launcher": "torchrun", "nproc_per_node": 2}}
    )
    cmd = spawn.stage_command(cfg, 7)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and "--standalone" in cmd
    assert cmd[cmd.index("--module") + 1 :][:3] == ["daemon.training.stage", "--stage-id", "7"]
    multi = config_mod.from_dict(
        {
            "state_dir": str(tmp_path),
            "training": {"launcher": "torchrun", "nnodes": 2, "rdzv_endpoint": "10.0.0.1:29400"},
        }
    )
    cmd = spawn.stage_command(multi, 7)
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    assert "--standalone" not in cmd
    warm = spawn.warm_trainer(cfg)
    warm.prewarm()
    assert warm.pid is None  # torchrun stages start cold
