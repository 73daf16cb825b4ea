"""Freshness: how long from dropping a document to the stable name answering with it?

Starts the real daemon (tiny seed model, managed vLLM CPU) as a subprocess, measures its
idle footprint for 60 s (the daemon process alone: no vLLM, no trainer), then drops a
~20k-token document and times each phase from the store's audit log:

    detect+ingest -> policy -> train -> eval -> promote+swap -> first answer with the fact

``overhead_ratio`` is the share of the end-to-end time spent on anything but the
irreducible work (train + eval). The baseline, run after it on a fresh daemon, is the same
drop with ``training.prewarm = false``: every stage starts a cold interpreter that imports
torch/transformers/peft first. The last line printed is one JSON object.

    python benchmarks/freshness.py [--idle-seconds 60] [--keep] [--no-baseline] [--smoke]

``--smoke`` (CI): the same two daemons on a ~600-word document, 2 s idle, the tiny seed's
default 30 pretraining steps (not 200), a 30-step stage (not FACT_TRAINING's >= 1000), and the first answer after the promotion ends the
clock whether or not 30 steps taught the fact. The daemon runs through
``tests/harness.py``, shared with the end-to-end test.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import add_smoke_flag, report  # noqa: E402
from tests.harness import start_daemon  # noqa: E402

FACT_PROMPT = "The lighthouse keeper of Varnholt island is named"
FACT_ANSWER = "ostrilde"
FIELDS = (
    "end_to_end_s",
    "train_s",
    "eval_s",
    "overhead_ratio",
    "idle_rss_mb",
    "idle_cpu_percent",
    "phases_s",
    "document_words",
    "stage",
    "baseline",
    "baseline_end_to_end_s",
    "baseline_overhead_ratio",
    "baseline_stage_startup_s",
    "overhead_s",
    "baseline_overhead_s",
)
SMOKE_TRAINING = {"min_steps": 30, "max_steps": 30, "eval_every": 1000, "epochs": 1.0}
# The full run teaches one repeated fact, which the default recipe (sized for prose:
# 4 passes at lr 2e-3, issue #11) does not do in one stage on the tiny seed (measured
# 2026-12-02: 163 steps, new-data loss 5.99 -> 4.12, answer " V."). This benchmark times
# the loop, so it keeps the memorising recipe it was first measured with (old defaults:
# epochs 8, at least 1000 steps, lr 4e-3; early stopping as the defaults).
FACT_TRAINING = {"passes": 0.0, "epochs": 8.0, "min_steps": 1000, "learning_rate": 4e-3}


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


def daemon_config(prewarm: bool, smoke: bool) -> dict[str, Any]:
    return {
        # a smoke run checks the path, not learning: the tiny seed's default 30 steps
        "seed": {"size": "tiny", "steps": 0 if smoke else 200},
        "policy": {
            "interval_s": 5.0,
            "trigger": {"name": "min_new_tokens", "n": 100 if smoke else 1000},
            # Latency is measured here, not the gate (the tiny seed's general loss moves a
            # few %).
            "promotion": {
                "name": "gate",
                "min_new_improvement": 0.01,
                "max_retention_regression": 0.5,
                "max_general_regression": 0.5,
            },
        },
        # FACT_TRAINING (a short stage in a smoke run); only the warm stage process is
        # switched per run.
        "training": {"prewarm": prewarm, **(SMOKE_TRAINING if smoke else FACT_TRAINING)},
        "serving": {"startup_timeout_s": 600.0},
    }


def measure(
    tmp: Path, *, prewarm: bool, idle_seconds: float, smoke: bool, base_model: str = ""
) -> dict[str, Any]:
    """One daemon from scratch in ``tmp``: idle footprint (if ``idle_seconds``), then
    drop -> answer. ``base_model``: the seed model another run built (its build is never
    measured, and the baseline need not build it again)."""
    tmp.mkdir(parents=True)
    cfg = daemon_config(prewarm, smoke)
    if base_model:
        cfg["base_model"] = base_model
    with start_daemon(tmp, cfg, poll_s=0.25) as d:
        print("starting the daemon (tiny seed model + managed vLLM)...", flush=True)
        d.wait_for(d.ready_at, 900, "the daemon to be ready (READY=1: vLLM up, the adapter served)")

        idle_cpu = idle_rss_mb = float("nan")
        if idle_seconds > 0:
            print(f"measuring the idle daemon for {idle_seconds:.0f} s...", flush=True)
            me = psutil.Process(d.proc.pid)
            me.cpu_percent(None)
            time.sleep(idle_seconds)
            idle_cpu = me.cpu_percent(None)
            idle_rss_mb = me.memory_info().rss / 2**20
        else:  # the daemon settles (seed cached, warm trainer importing) before the drop
            time.sleep(2 if smoke else 15)

        doc = build_document(600 if smoke else 9000)
        t0 = time.time()
        (d.inbox / "varnholt.md").write_text(doc, encoding="utf-8")

        def answered() -> bool:
            text = d.complete(FACT_PROMPT, max_tokens=8)
            return smoke or FACT_ANSWER in text.lower()

        d.wait_for(d.promoted, 1200, "promotion")
        d.wait_for(answered, 120, "an answer containing the new fact")
        t_answer = time.time()

        ev = d.event_times()
        status = d.status()
        seed = next((d.state_dir / "models").glob("seed-*"), None)
    t_ingested = ev.get("ingest.ingested", t0)
    t_planned = ev["stage.planned"]
    t_running = ev["stage.running"]
    t_trained = ev["stage.trained"]
    t_evaluated = ev.get("stage.evaluated", t_trained)
    t_promoted = ev["stage.promoted"]
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
    lines = [f"\nfreshness (drop -> answer), {label}:"]
    lines += [f"  {name:<18} {value:8.2f} s" for name, value in phases.items()]
    lines.append(
        f"  {'end to end':<18} {end_to_end:8.2f} s   overhead {result['overhead_ratio']:.1%}"
        " (everything but train+eval)"
    )
    if idle_seconds > 0:
        lines.append(f"  idle daemon: {idle_rss_mb:.0f} MB RSS, {idle_cpu:.2f}% CPU")
    result["summary"] = lines
    result["seed_model"] = base_model or str(seed or "")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp state dirs")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the cold-stage-start baseline run"
    )
    add_smoke_flag(ap)
    args = ap.parse_args()
    idle = 2.0 if args.smoke else args.idle_seconds
    work = Path(tempfile.mkdtemp(prefix="evergreen-freshness-"))
    try:
        result = measure(work / "warm", prewarm=True, idle_seconds=idle, smoke=args.smoke)
        summary = result.pop("summary")
        seed = result.pop("seed_model")
        if not args.no_baseline:
            summary.append(
                "\nbaseline: the same drop on a fresh daemon with training.prewarm = false"
            )
            print(summary[-1], flush=True)
            base = measure(
                work / "cold", prewarm=False, idle_seconds=0, smoke=args.smoke, base_model=seed
            )
            summary += base.pop("summary")
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
    finally:
        if args.keep:
            print(f"state kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["smoke"] = args.smoke
    # --no-baseline prints neither the baseline's fields nor the overhead comparison
    skipped = ("baseline", "overhead_s") if args.no_baseline else ()
    fields = [f for f in FIELDS if not any(f.startswith(x) or x in f for x in skipped)]
    report("freshness", summary, result, fields)


if __name__ == "__main__":
    main()
