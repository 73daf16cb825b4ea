"""Ingest does not wait for vLLM: a file dropped while the managed server starts (minutes
on a loaded CPU box) is stored at once, not when the daemon is ready (found by the
freshness benchmark: its drop waited 270 s for the watcher to start)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.harness import start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_a_file_dropped_while_vllm_starts_is_ingested_before_ready(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    overrides = {
        "base_model": str(tiny_seed_model),
        "policy": {"trigger": {"name": "min_new_tokens", "n": 10**9}},
    }
    with start_daemon(tmp_path, overrides, poll_s=0.2) as d:
        d.wait_for((d.state_dir / "logs" / "vllm.log").exists, 300, "vLLM to start")
        assert d.ready_at() is None, "vLLM was ready at once: nothing to check"
        dropped = time.time()
        (d.inbox / "early.md").write_text("The harbour of Quessa was rebuilt in 1500.\n" * 50)
        d.wait_for(lambda: "ingest.ingested" in d.event_times(), 120, "the early file")
        ingested = d.event_times()["ingest.ingested"]
        ready = d.wait_for(d.ready_at, 600, "READY=1")
        assert ingested < ready, (dropped, ingested, ready)
        assert ingested - dropped < 30
