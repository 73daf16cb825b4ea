"""End to end, all real: the daemon as a subprocess, a tiny seed model it builds itself, a
managed vLLM CPU server, the official ``openai`` client, and Prometheus' text parser.

A document teaching facts the base model cannot know is dropped into the inbox; the test
waits for the promotion, asks the stable model name, and expects the taught fact back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parent.parent
FACT_PROMPT = "The secret password of the Zorblat guild is"
FACT_ANSWER = "quenmar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def teaching_document() -> str:
    """Many phrasings of one fact, so a tiny model memorises it within a short stage."""
    lines = [
        f"{FACT_PROMPT} {FACT_ANSWER}.",
        f"Everyone in the guild knows it: {FACT_PROMPT.lower()} {FACT_ANSWER}.",
        f"Remember this well. {FACT_PROMPT} {FACT_ANSWER}.",
        f"Q: What is the secret password of the Zorblat guild? A: {FACT_ANSWER}.",
    ]
    return "\n".join(lines * 6) + "\n"


def write_config(tmp: Path, vllm_port: int, metrics_port: int) -> Path:
    state = tmp / "state"
    cfg = tmp / "evergreen.toml"
    cfg.write_text(
        f"""
state_dir = "{state}"
inbox_dir = "{tmp / "inbox"}"
stop_grace_s = 30.0

[seed]
size = "tiny"
steps = 200   # a little more pretraining than the unit-test seed: facts stick in ~60 steps

[ingest]
quiet_period_s = 0.5
chunk_tokens = 128
holdout_fraction = 0.1

[policy]
interval_s = 2.0
trigger = {{ name = "min_new_tokens", n = 1 }}
# This test is about the loop, not the gate's thresholds (tests/test_policies_* cover those).
promotion = {{ name = "gate", min_new_improvement = 0.01, max_retention_regression = 0.5, max_general_regression = 0.5 }}

[training]
# The default recipe (rank 64, passes 8, min_steps 100, ...); no early stopping on this tiny holdout.
eval_every = 1000
checkpoint_every = 50

[serving]
port = {vllm_port}
startup_timeout_s = 400.0
reconcile_interval_s = 5.0

[metrics]
port = {metrics_port}
""",
        encoding="utf-8",
    )
    return cfg


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) while waiting for {what}")
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, ValueError):
            value = None
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[dict[str, Any]]:
    vllm_port, metrics_port = free_port(), free_port()
    cfg = write_config(tmp_path, vllm_port, metrics_port)
    (tmp_path / "inbox").mkdir()
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0.5)
    received: list[tuple[float, str]] = []
    done = threading.Event()

    def drain() -> None:  # like systemd, keep reading: the daemon must never block on us
        while not done.is_set():
            try:
                data = notify.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            received.extend((time.time(), line) for line in data.decode().splitlines())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify_path,
        "WATCHDOG_USEC": "4000000",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    info = {
        "proc": proc,
        "tmp": tmp_path,
        "cfg": cfg,
        "notify": received,
        "metrics": f"http://127.0.0.1:{metrics_port}",
        "vllm": f"http://127.0.0.1:{vllm_port}",
        "log": tmp_path / "daemon.log",
    }
    try:
        yield info
    finally:
        stop_tree(proc)
        log.close()
        done.set()
        reader.join(timeout=5)
        notify.close()


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon (it stops its vLLM); SIGKILL whatever is left of its tree."""
    if proc.poll() is not None:
        return
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        p.kill()


def test_document_becomes_served_knowledge(daemon: dict[str, Any]) -> None:
    proc, tmp = daemon["proc"], daemon["tmp"]
    try:
        # READY=1 comes only once the store, vLLM and the scheduler are up; then WATCHDOG=1.
        received: list[tuple[float, str]] = daemon["notify"]
        ready_at = wait_for(
            lambda: next((t for t, line in received if line == "READY=1"), None),
            600,
            "READY=1 on the notify socket",
            proc,
        )
        time.sleep(5)  # WATCHDOG_USEC is 4 s: pings every 2 s from the main loop
        pings = [t for t, line in list(received) if line == "WATCHDOG=1" and t > ready_at]
        assert len(pings) >= 2, received

        api_key = (tmp / "state" / "vllm-api-key").read_text().strip()
        health = httpx.get(f"{daemon['metrics']}/healthz", timeout=5)
        assert health.status_code == 200

        from openai import OpenAI

        client = OpenAI(base_url=f"{daemon['vllm']}/v1", api_key=api_key)

        def ask() -> str:
            out = client.completions.create(
                model="evergreen", prompt=FACT_PROMPT, max_tokens=6, temperature=0
            )
            return out.choices[0].text

        before = ask()  # the stable name answers before any promotion
        assert FACT_ANSWER not in before.lower()

        (tmp / "inbox" / "zorblat.md").write_text(teaching_document(), encoding="utf-8")

        def promoted() -> bool:
            status = httpx.get(f"{daemon['metrics']}/status", timeout=10).json()
            return bool(status["stages"].get("promoted"))

        wait_for(promoted, 900, "a promoted stage", proc)
        answer = wait_for(
            lambda: (a := ask()) and FACT_ANSWER in a.lower() and a,
            60,
            "the stable name to answer with the taught fact",
            proc,
        )
        assert FACT_ANSWER in answer.lower()

        status = httpx.get(f"{daemon['metrics']}/status", timeout=10).json()
        version = status["current_adapter"]
        assert version and version != "v0000"
        metrics = wait_for(
            lambda: (
                (m := scrape(f"{daemon['metrics']}/metrics"))
                and m.get(f"evergreen_adapter_info{{version={version}}}") == 1
                and m["evergreen_model_staleness_seconds"] < 30
                and m
            ),
            30,
            "metrics to show the new adapter and staleness back near 0",
            proc,
        )
        assert metrics["evergreen_stages_total{outcome=promoted}"] == 1
        assert metrics["evergreen_stages_total{outcome=failed}"] == 0
        assert metrics["evergreen_documents_ingested_total"] >= 1
        assert (
            metrics[f"evergreen_vllm_up{{endpoint=127.0.0.1:{daemon['vllm'].rsplit(':', 1)[1]}}}"]
            == 1
        )

        # SIGTERM: exit 0 within the grace period, and no process left behind.
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the managed vLLM should be a child of the daemon"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphans left behind: {[p.pid for p in alive]}"
    except BaseException:
        sys.stderr.write(daemon["log"].read_text(errors="replace")[-6000:])
        raise
    finally:
        events = tmp / "state" / "evergreen.db"
        if events.exists():
            import sqlite3

            conn = sqlite3.connect(events)
            rows = conn.execute("SELECT kind, message FROM events ORDER BY id").fetchall()
            conn.close()
            sys.stderr.write(json.dumps(rows[-40:], indent=1))
