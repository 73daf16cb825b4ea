"""One stage plan trained by 1 process and by 2 (torchrun: DDP, then FSDP), side by side.

Real store, real plan, the tiny seed model, the real stage subprocess: once with
``training.launcher = "local"`` and once with ``"torchrun"`` and ``nproc_per_node = 2``
(gloo on CPU). Both stages get the same documents, seed and recipe; ``grad_accum`` is the
global number of micro-batches per optimizer step, so both take the same steps on the
same batches and should reach the same holdout loss. Each process of the 2-process run
gets half of the training cores (placement), so on a CPU box this measures the cost of
DDP (gradient all-reduce, a second model copy), not a speedup: on 2 cores none is
expected. On 8 GPUs the same code runs 8 ranks with nccl, one per GPU, each doing 1/8 of
each step's micro-batches: the stage should take about 1/8 of the time minus the
all-reduce of the LoRA gradients (a few MB per step at rank 64), i.e. near-linear.

The third run is the same plan with ``training.distributed = "fsdp"``: FSDP2 shards every
weight over the 2 ranks and all-gathers each layer's weights in every forward and
backward, so on CPU it costs more than DDP for the same steps; it exists for a base
model that does not fit one device, where it is the only way to train at all.

Last line: JSON with ``tokens_per_s_1``, ``tokens_per_s_2``, ``loss_delta`` (relative
holdout-loss difference, 2 processes vs 1), the same for FSDP (``tokens_per_s_2_fsdp``,
``loss_delta_fsdp``), plus the raw losses, steps and wall times.
Usage: ``python benchmarks/distributed.py [--base-model DIR] [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import add_smoke_flag, report  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.serving import promotion  # noqa: E402
from daemon.training import runner  # noqa: E402
from store.db import open_db  # noqa: E402
from tests.fixtures_model import add_doc  # noqa: E402

FIELDS = [
    "tokens_per_s_1",
    "tokens_per_s_2",
    "loss_delta",
    "loss_1",
    "loss_2",
    "steps",
    "tokens_per_s_2_fsdp",
    "loss_delta_fsdp",
    "loss_2_fsdp",
]


def facts(n: int) -> tuple[list[str], list[str]]:
    """``n`` training sentences of made-up facts and a few held-out ones."""
    train = [
        f"The glorp number {i} lives in Vantor{i} and eats {i % 7} red pebbles." for i in range(n)
    ]
    hold = [
        f"The glorp number {i} lives in Vantor{i} and eats {i % 7} red pebbles."
        for i in range(n, n + max(2, n // 8))
    ]
    return train, hold


def one_run(
    state: Path, base: str, launcher: str, epochs: float, n: int, *, distributed: str = "ddp"
) -> dict[str, Any]:
    state.mkdir(parents=True)
    cfg = config_mod.from_dict(
        {
            "state_dir": str(state),
            "base_model": base,
            "seed": {"size": "tiny"},
            "serving": {"mode": "none"},
            "training": {
                "launcher": launcher,
                "distributed": distributed,
                "nproc_per_node": 2,
                "epochs": epochs,
                "passes": 0.0,
                "min_steps": 0,
                "lora_rank": 16,
                "max_seq_len": 128,
                "batch_tokens": 256,
                "grad_accum": 2,
                "eval_every": 0,
                "checkpoint_every": 100_000,
            },
            "policy": {"promotion": {"name": "gate", "min_new_improvement": 0.0}},
        }
    )
    db = open_db(cfg.db_path)
    try:
        train, hold = facts(n)
        add_doc(db, train, holdout=hold)
        t0 = time.monotonic()
        res = runner.run_stage(cfg, db, promote=lambda v, r: promotion.promote(cfg, v, r))
        wall = time.monotonic() - t0
    finally:
        db.conn.close()
    if res.status not in ("promoted", "rejected"):
        raise SystemExit(f"distributed: the {launcher} stage ended {res.status}: {res.reason}")
    t = res.metrics["training"]
    return {
        "tps": t["tokens_per_s"],
        "loss": res.metrics["candidate"]["new_loss"],
        "base_loss": res.metrics["baseline"]["new_loss"],
        "steps": t["steps"],
        "processes": t.get("processes", 1),
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="", help="HF model dir (default: tiny seed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp state dir")
    add_smoke_flag(parser)
    args = parser.parse_args()
    epochs, n = (12.0, 16) if args.smoke else (20.0, 96)
    state = Path(tempfile.mkdtemp(prefix="evergreen-bench-distributed-"))
    try:
        base = args.base_model
        if not base:
            from daemon.training.seed import ensure_seed_model

            seed_cfg = config_mod.from_dict(
                {"state_dir": str(state / "seed"), "seed": {"size": "tiny"}}
            )
            print("building the tiny seed model ...", flush=True)
            base = str(ensure_seed_model(seed_cfg))
        one = one_run(state / "one", base, "local", epochs, n)
        print(f"1 process:   {one}", flush=True)
        two = one_run(state / "two", base, "torchrun", epochs, n)
        print(f"2 processes: {two}", flush=True)
        fsdp = one_run(state / "fsdp", base, "torchrun", epochs, n, distributed="fsdp")
        print(f"2 processes, FSDP: {fsdp}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    delta = (two["loss"] - one["loss"]) / one["loss"]
    delta_fsdp = (fsdp["loss"] - one["loss"]) / one["loss"]
    load = os.getloadavg()[0]
    summary = [
        "",
        f"one plan, {one['steps']} steps: 1 process {one['tps']:.0f} tok/s"
        f" ({one['wall_s']:.1f} s wall), 2 processes {two['tps']:.0f} tok/s"
        f" ({two['wall_s']:.1f} s wall, torchrun start-up included)",
        f"holdout loss {one['base_loss']:.3f} -> {one['loss']:.4f} (1) vs {two['loss']:.4f} (2):"
        f" delta {delta:+.2%}",
        f"FSDP, 2 processes: {fsdp['tps']:.0f} tok/s ({fsdp['wall_s']:.1f} s wall),"
        f" holdout loss {fsdp['loss']:.4f}: delta {delta_fsdp:+.2%}",
        f"load average {load:.1f} on {os.cpu_count()} cores: figures are provisional",
    ]
    result = {
        "tokens_per_s_1": round(one["tps"], 1),
        "tokens_per_s_2": round(two["tps"], 1),
        "loss_delta": round(delta, 5),
        "loss_1": round(one["loss"], 5),
        "loss_2": round(two["loss"], 5),
        "steps": one["steps"],
        "steps_2": two["steps"],
        "processes_2": two["processes"],
        "wall_s_1": round(one["wall_s"], 1),
        "wall_s_2": round(two["wall_s"], 1),
        "tokens_per_s_2_fsdp": round(fsdp["tps"], 1),
        "loss_delta_fsdp": round(delta_fsdp, 5),
        "loss_2_fsdp": round(fsdp["loss"], 5),
        "steps_2_fsdp": fsdp["steps"],
        "wall_s_2_fsdp": round(fsdp["wall_s"], 1),
        "load_avg_1m": round(load, 2),
        "smoke": args.smoke,
    }
    report("distributed", summary, result, FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
