"""End to end, all real: the daemon as a subprocess, a tiny seed model it builds itself, a
managed vLLM CPU server, the official ``openai`` client, and Prometheus' text parser.

A document teaching a fact the base model cannot know is dropped into the inbox; the test
waits for the promotion, asks the stable model name, and expects the taught fact back.
The daemon runs through ``tests/harness.py`` (shared with ``benchmarks/freshness.py``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import Daemon, HarnessError, start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FACT_PROMPT = "The secret password of the Zorblat guild is"
FACT_ANSWER = "quenmar"

# The recipe is sized to what the test checks, one fact stated many times, not to the
# continual benchmark's 4 domains of facts (the defaults: rank 64, passes 8): rank 16
# (alpha 32, so updates are scaled x2, not x0.5), lr 5e-3 and 150 steps of 1024 tokens
# teach the 30-step tiny seed this fact (80 steps at 3e-3 did not: " qu the Z."); max_steps
# caps the stage whatever the defaults become, so a loaded machine takes minutes for it.
MIN_STEPS, MAX_STEPS = 150, 200
CONFIG: dict[str, Any] = {
    "stop_grace_s": 30.0,
    # the tiny seed as the unit tests build it (30 steps): built in ~30 s even on a loaded
    # machine, and always fully; 200 steps ran into the 300 s build budget (159 steps) there
    "seed": {"size": "tiny"},
    "ingest": {"quiet_period_s": 0.5, "chunk_tokens": 128, "holdout_fraction": 0.1},
    "policy": {
        "interval_s": 2.0,
        "trigger": {"name": "min_new_tokens", "n": 1},
        # This test is about the loop, not the gate's thresholds (test_policies_* are).
        "promotion": {
            "name": "gate",
            "min_new_improvement": 0.01,
            "max_retention_regression": 0.5,
            "max_general_regression": 0.5,
        },
    },
    "training": {
        "lora_rank": 16,
        "learning_rate": 5e-3,
        "batch_tokens": 1024,
        "epochs": 1.0,  # min_steps sets the length: the document repeats until then
        "min_steps": MIN_STEPS,
        "max_steps": MAX_STEPS,
        "eval_every": 1000,  # no early stopping on this tiny holdout
        "checkpoint_every": 50,
    },
    "serving": {"startup_timeout_s": 400.0, "reconcile_interval_s": 5.0},
}


def teaching_document() -> str:
    """Many phrasings of one fact, so a tiny model memorises it within a short stage."""
    lines = [
        f"{FACT_PROMPT} {FACT_ANSWER}.",
        f"Everyone in the guild knows it: {FACT_PROMPT.lower()} {FACT_ANSWER}.",
        f"Remember this well. {FACT_PROMPT} {FACT_ANSWER}.",
        f"Q: What is the secret password of the Zorblat guild? A: {FACT_ANSWER}.",
    ]
    return "\n".join(lines * 6) + "\n"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    # WATCHDOG_USEC 4 s: the daemon must ping every 2 s from its main loop.
    with start_daemon(tmp_path, CONFIG, env={"WATCHDOG_USEC": "4000000"}) as d:
        yield d


def test_document_becomes_served_knowledge(daemon: Daemon) -> None:
    proc = daemon.proc
    try:
        # READY=1 comes only once the store, vLLM and the scheduler are up; then WATCHDOG=1.
        ready_at = daemon.wait_for(daemon.ready_at, 600, "READY=1 on the notify socket")
        daemon.wait_for(
            lambda: (
                sum(1 for t, line in list(daemon.notify) if line == "WATCHDOG=1" and t > ready_at)
                >= 2
            ),
            30,
            "two WATCHDOG=1 pings after READY=1 (WATCHDOG_USEC is 4 s)",
        )
        assert daemon.healthy()

        from openai import OpenAI

        client = OpenAI(base_url=f"{daemon.vllm_url}/v1", api_key=daemon.api_key())

        def ask() -> str:
            out = client.completions.create(
                model="evergreen", prompt=FACT_PROMPT, max_tokens=6, temperature=0
            )
            return out.choices[0].text

        before = ask()  # the stable name answers before any promotion
        assert FACT_ANSWER not in before.lower()

        (daemon.inbox / "zorblat.md").write_text(teaching_document(), encoding="utf-8")

        daemon.wait_for(daemon.promoted, 900, "a promoted stage")
        answers: list[str] = []
        try:
            answer = daemon.wait_for(
                lambda: answers.append(a := ask()) or (FACT_ANSWER in a.lower() and a),
                60,
                "the stable name to answer with the taught fact",
            )
        except HarnessError as exc:
            raise HarnessError(f"{exc}; its last answers: {answers[-3:]}") from None
        assert FACT_ANSWER in answer.lower()

        status = daemon.status()
        version = status["current_adapter"]
        assert version and version != "v0000"
        steps = status["last_stage"]["metrics"]["training"]["steps"]
        assert MIN_STEPS <= steps <= MAX_STEPS, f"the test's recipe sets the length: {steps} steps"
        metrics = daemon.wait_for(
            lambda: (
                (m := daemon.metrics())
                and m.get(f"evergreen_adapter_info{{version={version}}}") == 1
                and m["evergreen_model_staleness_seconds"] < 30
                and m
            ),
            30,
            "metrics to show the new adapter and staleness back near 0",
        )
        assert metrics["evergreen_stages_total{outcome=promoted}"] == 1
        assert metrics["evergreen_stages_total{outcome=failed}"] == 0
        assert metrics["evergreen_documents_ingested_total"] >= 1
        assert metrics[f"evergreen_vllm_up{{endpoint=127.0.0.1:{daemon.vllm_port}}}"] == 1

        # SIGTERM: exit 0 within the grace period, and no process left behind.
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the managed vLLM should be a child of the daemon"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphans left behind: {[p.pid for p in alive]}"
    except BaseException:
        sys.stderr.write(daemon.log_tail())
        sys.stderr.write("\n".join(f"{k}: {m}" for k, m in daemon.events()) + "\n")
        raise
