"""Serving and training on one box: vLLM latency and stage speed, alone and together.

For each of two placements, the default one (``[placement]`` computed from the machine)
and none (``placement.enabled = false``: every process sees every core), on a real managed
vLLM CPU server and a real stage subprocess on the tiny seed model:

1. serving alone: 4 client threads send completions back to back for a window; latency
   p50/p99;
2. training alone: a long stage runs; tokens/s over the same window (the stage's own
   token counter, read from its progress lines);
3. both at once: the same stage process goes on training while the 4 clients run.

Ratios are together / alone. Targets: ``serve_p99_ratio`` <= 2.0 and
``train_tps_ratio`` >= 0.4, both better than without placement. On a machine shared
with other work the figures are provisional; the summary prints the load average.

Last line: JSON with ``serve_p99_ratio``, ``train_tps_ratio``,
``serve_p99_ratio_unplaced``, ``train_tps_ratio_unplaced`` and the raw p50/p99/tokens/s.
Usage: ``python benchmarks/colocation.py [--base-model DIR] [--window S] [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import add_smoke_flag, report  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.config import Config  # noqa: E402
from daemon.scheduling import placement  # noqa: E402
from daemon.serving.vllm import ManagedVLLM  # noqa: E402
from daemon.training import plan as plan_mod  # noqa: E402
from daemon.training import spawn  # noqa: E402
from store.db import open_db  # noqa: E402
from tests.fixtures_model import add_doc  # noqa: E402
from tests.fixtures_vllm import free_port  # noqa: E402

CLIENTS = 4
MAX_TOKENS = 16
FIELDS = [
    "serve_p99_ratio",
    "train_tps_ratio",
    "serve_p99_ratio_unplaced",
    "train_tps_ratio_unplaced",
    "serve_p50_alone",
    "serve_p99_alone",
    "serve_p50_together",
    "serve_p99_together",
    "train_tps_alone",
    "train_tps_together",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def serve_window(server: ManagedVLLM, model: str, seconds: float) -> list[float]:
    """Latencies (s) of completions sent back to back by CLIENTS threads for ``seconds``."""
    lat: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(n: int) -> None:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
            i = 0
            while time.monotonic() < end:
                body = {
                    "model": model,
                    "prompt": f"Client {n} asks {i}: the",
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0.0,
                    "ignore_eos": True,
                }
                t0 = time.monotonic()
                resp = http.post("/v1/completions", json=body)
                resp.raise_for_status()
                with lock:
                    lat.append(time.monotonic() - t0)
                i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


class Stage:
    """The stage subprocess in a thread; ``tps_over(seconds)`` measures it while it runs."""

    def __init__(self, cfg: Config, stage_id: int) -> None:
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=spawn.spawn_stage,
            args=(cfg, stage_id),
            kwargs={"on_progress": self._on, "stop_event": self.stop, "timeout_s": 3600},
        )

    def _on(self, msg: dict[str, Any]) -> None:
        if msg.get("event") == "progress" and "tokens" in msg:
            self.samples.append((time.monotonic(), int(msg["tokens"])))

    def __enter__(self) -> Stage:
        self.thread.start()
        deadline = time.monotonic() + 600
        while len(self.samples) < 3:  # model loaded, training under way
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise SystemExit("colocation: the stage did not start training")
            time.sleep(0.1)
        return self

    def tokens_at(self, t: float) -> tuple[float, int]:
        """The last progress sample at or before ``t``."""
        before = [s for s in self.samples if s[0] <= t]
        return before[-1] if before else self.samples[0]

    def tps_between(self, t0: float, t1: float) -> float:
        (a, ta), (b, tb) = self.tokens_at(t0), self.tokens_at(t1)
        return (tb - ta) / max(1e-9, b - a)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def measure(state: Path, base: str, placed: bool, window: float) -> dict[str, Any]:
    """Alone, alone, together, under one placement."""
    state.mkdir(parents=True)
    cfg = config_mod.from_dict(
        {
            "state_dir": str(state),
            "base_model": base,
            "seed": {"size": "tiny"},
            "placement": {"enabled": placed},
            "serving": {"port": free_port(), "max_lora_rank": 16, "max_model_len": 512},
            "training": {
                "lora_rank": 16,
                "epochs": 1000.0,
                "passes": 0.0,
                "min_steps": 0,
                "batch_tokens": 256,
                "max_seq_len": 128,
                "eval_every": 0,
                "checkpoint_every": 1_000_000,
                "prewarm": False,
            },
        }
    )
    db = open_db(cfg.db_path)
    add_doc(
        db, [f"Fact {i}: the glorp {i} lives in Vantor{i} near the red hills." for i in range(64)]
    )
    sid = plan_mod.write_plan(cfg, db)
    db.conn.close()
    assert sid is not None
    print(f"-- {placement.for_config(cfg).describe()}", flush=True)
    server = ManagedVLLM(cfg)
    server.start()
    try:
        if not server.wait_healthy():
            raise SystemExit(f"colocation: vLLM did not start: {server.log_tail()}")
        model = str(cfg.resolved_base_model())
        serve_window(server, model, min(3.0, window / 4))  # warm-up
        alone = serve_window(server, model, window)
        with Stage(cfg, sid) as st:  # one stage process: first alone, then with clients
            t0 = time.monotonic()
            time.sleep(window)
            t1 = time.monotonic()
            together = serve_window(server, model, window)
            tps_alone, tps_together = st.tps_between(t0, t1), st.tps_between(t1, time.monotonic())
    finally:
        server.stop()
    out = {
        "p50_alone": percentile(alone, 50),
        "p99_alone": percentile(alone, 99),
        "p50_together": percentile(together, 50),
        "p99_together": percentile(together, 99),
        "requests_alone": len(alone),
        "requests_together": len(together),
        "tps_alone": tps_alone,
        "tps_together": tps_together,
    }
    out["p99_ratio"] = out["p99_together"] / out["p99_alone"]
    out["tps_ratio"] = tps_together / max(1e-9, tps_alone)
    print(f"   {out}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="", help="HF model dir (default: tiny seed)")
    parser.add_argument("--window", type=float, default=0.0, help="seconds per measurement")
    parser.add_argument("--keep", action="store_true", help="keep the temp state dir")
    add_smoke_flag(parser)
    args = parser.parse_args()
    window = args.window or (5.0 if args.smoke else 30.0)
    state = Path(tempfile.mkdtemp(prefix="evergreen-bench-colocation-"))
    try:
        base = args.base_model
        if not base:
            from daemon.training.seed import ensure_seed_model

            seed_cfg = config_mod.from_dict(
                {"state_dir": str(state / "seed"), "seed": {"size": "tiny"}}
            )
            print("building the tiny seed model ...", flush=True)
            base = str(ensure_seed_model(seed_cfg))
        placed = measure(state / "placed", base, True, window)
        unplaced = measure(state / "unplaced", base, False, window)
    finally:
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    load = os.getloadavg()[0]
    ms = 1000.0
    summary = [""]
    for name, m in (("default placement", placed), ("no placement", unplaced)):
        summary.append(
            f"{name}: vLLM p50/p99 {m['p50_alone'] * ms:.0f}/{m['p99_alone'] * ms:.0f} ms alone,"
            f" {m['p50_together'] * ms:.0f}/{m['p99_together'] * ms:.0f} ms with a stage"
            f" (p99 x{m['p99_ratio']:.2f}); stage {m['tps_alone']:.0f} tok/s alone,"
            f" {m['tps_together']:.0f} with serving (x{m['tps_ratio']:.2f})"
        )
    summary.append(
        f"targets: serve_p99_ratio <= 2.0 and train_tps_ratio >= 0.4, better than unplaced;"
        f" load average {load:.1f} on {os.cpu_count()} cores (provisional on a shared box)"
    )
    result = {
        "serve_p99_ratio": round(placed["p99_ratio"], 3),
        "train_tps_ratio": round(placed["tps_ratio"], 3),
        "serve_p99_ratio_unplaced": round(unplaced["p99_ratio"], 3),
        "train_tps_ratio_unplaced": round(unplaced["tps_ratio"], 3),
        "serve_p50_alone": round(placed["p50_alone"], 4),
        "serve_p99_alone": round(placed["p99_alone"], 4),
        "serve_p50_together": round(placed["p50_together"], 4),
        "serve_p99_together": round(placed["p99_together"], 4),
        "train_tps_alone": round(placed["tps_alone"], 1),
        "train_tps_together": round(placed["tps_together"], 1),
        "unplaced": {k: round(v, 4) for k, v in unplaced.items()},
        "requests": placed["requests_alone"] + placed["requests_together"],
        "window_s": window,
        "load_avg_1m": round(load, 2),
        "smoke": args.smoke,
    }
    report("colocation", summary, result, FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
