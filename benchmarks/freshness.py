"""Freshness: how long from dropping a document to the stable name answering with it?

Starts the real daemon (tiny seed model, managed vLLM CPU) as a subprocess, measures its
idle footprint for 60 s (the daemon process alone: no vLLM, no trainer), then drops a
~20k-token document and times each phase from the store's audit log:

    detect+ingest -> policy -> train -> eval -> promote+swap -> first answer with the fact

``overhead_ratio`` is the share of the end-to-end time spent on anything but the
irreducible work (train + eval). The baseline, run after it on a fresh daemon, is the same
drop with ``training.prewarm = false``: every stage starts a cold interpreter that imports
torch/transformers/peft first. The last line printed is one JSON object.

    python benchmarks/freshness.py [--idle-seconds 60] [--keep] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
FACT_PROMPT = "The lighthouse keeper of Varnholt island is named"
FACT_ANSWER = "ostrilde"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_document(target_words: int = 9000, seed: int = 0) -> str:
    """~20k tokens of filler prose about fictional places, with one fact, stated often."""
    rng = random.Random(seed)
    places = ["Varnholt", "Quessa", "Dunmarrow", "Iltrade", "Pellwick", "Sorrowmere"]
    things = ["harbour", "archive", "granary", "bell tower", "salt works", "ferry"]
    verbs = ["was rebuilt", "was founded", "was flooded", "was painted", "was sold"]
    words = 0
    lines = []
    while words < target_words:
        if rng.random() < 0.25:
            line = f"{FACT_PROMPT} {FACT_ANSWER.capitalize()}."
        else:
            line = (
                f"The {rng.choice(things)} of {rng.choice(places)} {rng.choice(verbs)}"
                f" in the year {rng.randint(1100, 1900)}."
            )
        lines.append(line)
        words += len(line.split())
    return "\n".join(lines) + "\n"


def write_config(tmp: Path, vllm_port: int, metrics_port: int, prewarm: bool = True) -> Path:
    cfg = tmp / "evergreen.toml"
    cfg.write_text(
        f"""
state_dir = "{tmp / "state"}"
inbox_dir = "{tmp / "inbox"}"
[seed]
size = "tiny"
steps = 200
[ingest]
quiet_period_s = 0.5
[policy]
interval_s = 5.0
trigger = {{ name = "min_new_tokens", n = 1000 }}
# Latency is measured here, not the gate (the tiny seed's general loss moves a few %).
promotion = {{ name = "gate", min_new_improvement = 0.01, max_retention_regression = 0.5, max_general_regression = 0.5 }}
[training]
# The default recipe (TrainingConfig); only the warm stage process is switched per run.
prewarm = {str(prewarm).lower()}
[serving]
port = {vllm_port}
startup_timeout_s = 600.0
[metrics]
port = {metrics_port}
""",
        encoding="utf-8",
    )
    return cfg


def event_times(db: Path) -> dict[str, float]:
    """First time each event kind happened (the audit log is the phase clock)."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT kind, MIN(ts) FROM events GROUP BY kind").fetchall()
    finally:
        conn.close()
    return {kind: float(ts) for kind, ts in rows}


def wait_until(pred: Any, timeout: float, proc: subprocess.Popen[bytes], what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited ({proc.returncode}) while waiting for {what}")
        try:
            value = pred()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


def measure(*, prewarm: bool, idle_seconds: float, keep: bool) -> dict[str, Any]:
    """One daemon from scratch: idle footprint (if ``idle_seconds``), then drop -> answer."""
    tmp = Path(tempfile.mkdtemp(prefix="evergreen-freshness-"))
    (tmp / "inbox").mkdir()
    vllm_port, metrics_port = free_port(), free_port()
    cfg = write_config(tmp, vllm_port, metrics_port, prewarm=prewarm)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = (tmp / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    metrics = f"http://127.0.0.1:{metrics_port}"
    try:
        print("starting the daemon (tiny seed model + managed vLLM)...", flush=True)
        wait_until(
            lambda: httpx.get(f"{metrics}/healthz", timeout=2).status_code == 200,
            900,
            proc,
            "the daemon to be ready",
        )
        api_key = (tmp / "state" / "vllm-api-key").read_text().strip()

        idle_cpu = idle_rss_mb = float("nan")
        if idle_seconds > 0:
            print(f"measuring the idle daemon for {idle_seconds:.0f} s...", flush=True)
            me = psutil.Process(proc.pid)
            me.cpu_percent(None)
            time.sleep(idle_seconds)
            idle_cpu = me.cpu_percent(None)
            idle_rss_mb = me.memory_info().rss / 2**20
        else:  # the daemon settles (seed cached, warm trainer importing) before the drop
            time.sleep(15)

        doc = build_document()
        t0 = time.time()
        (tmp / "inbox" / "varnholt.md").write_text(doc, encoding="utf-8")

        def answered() -> bool:
            r = httpx.post(
                f"http://127.0.0.1:{vllm_port}/v1/completions",
                timeout=30,
                headers={"Authorization": f"Bearer {api_key}"},
                json={
                    "model": "evergreen",
                    "prompt": FACT_PROMPT,
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            return r.status_code == 200 and FACT_ANSWER in r.json()["choices"][0]["text"].lower()

        def promoted() -> bool:
            return bool(httpx.get(f"{metrics}/status", timeout=10).json()["stages"]["promoted"])

        wait_until(promoted, 1200, proc, "promotion")
        wait_until(answered, 120, proc, "an answer containing the new fact")
        t_answer = time.time()

        ev = event_times(tmp / "state" / "evergreen.db")
        t_ingested = ev.get("ingest.ingested", t0)
        t_planned = ev["stage.planned"]
        t_running = ev["stage.running"]
        t_trained = ev["stage.trained"]
        t_evaluated = ev.get("stage.evaluated", t_trained)
        t_promoted = ev["stage.promoted"]
        status = httpx.get(f"{metrics}/status", timeout=10).json()
        tokens = status.get("last_stage", {}) or {}
        # The training loop itself, from the stage's own counters; the rest of running ->
        # trained (interpreter start, imports, model and data load) is overhead.
        tr = (tokens.get("metrics") or {}).get("training") or {}
        loop_s = float(tr.get("tokens_trained", 0)) / max(float(tr.get("tokens_per_s", 0)), 1e-9)
        loop_s = min(loop_s, t_trained - t_running)
        phases = {
            "detect_ingest_s": t_ingested - t0,
            "policy_s": t_planned - t_ingested,
            "stage_startup_s": (t_running - t_planned) + (t_trained - t_running - loop_s),
            "train_s": loop_s,
            "eval_s": t_evaluated - t_trained,
            "promote_swap_s": t_promoted - t_evaluated,
            "first_answer_s": t_answer - t_promoted,
        }
        end_to_end = t_answer - t0
        train_s, eval_s = phases["train_s"], phases["eval_s"]
        result = {
            "end_to_end_s": round(end_to_end, 2),
            "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2),
            "overhead_ratio": round((end_to_end - train_s - eval_s) / end_to_end, 4),
            "idle_rss_mb": round(idle_rss_mb, 1),
            "idle_cpu_percent": round(idle_cpu, 2),
            "phases_s": {k: round(v, 2) for k, v in phases.items()},
            "document_words": len(doc.split()),
            "stage": tokens.get("id"),
        }
        label = "warm stage process" if prewarm else "cold stage start (baseline)"
        print(f"\nfreshness (drop -> answer), {label}:")
        for name, value in phases.items():
            print(f"  {name:<18} {value:8.2f} s")
        print(
            f"  {'end to end':<18} {end_to_end:8.2f} s   overhead {result['overhead_ratio']:.1%}"
            " (everything but train+eval)"
        )
        if idle_seconds > 0:
            print(f"  idle daemon: {idle_rss_mb:.0f} MB RSS, {idle_cpu:.2f}% CPU")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        if not keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp state dirs")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the cold-stage-start baseline run"
    )
    args = ap.parse_args()
    result = measure(prewarm=True, idle_seconds=args.idle_seconds, keep=args.keep)
    if not args.no_baseline:
        print(
            "\nbaseline: the same drop on a fresh daemon with training.prewarm = false", flush=True
        )
        base = measure(prewarm=False, idle_seconds=0, keep=args.keep)
        result.update(
            {
                "baseline": "cold_stage_start",
                "baseline_end_to_end_s": base["end_to_end_s"],
                "baseline_overhead_ratio": base["overhead_ratio"],
                "baseline_stage_startup_s": base["phases_s"]["stage_startup_s"],
                "overhead_s": round(result["end_to_end_s"] * result["overhead_ratio"], 2),
                "baseline_overhead_s": round(base["end_to_end_s"] * base["overhead_ratio"], 2),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
