"""A running stage's progress is visible everywhere: ``evergreen status`` (table and
``--json``) and the daemon's ``/metrics``.

The stage row is put in ``running`` with a progress dict through the store functions, the
way the stage subprocess writes it (``stages.update_progress``); the daemon is the real
``evergreen serve`` process (no vLLM, no training, so the resumable "running" stage is left
alone) scraped over HTTP and parsed with prometheus_client's parser.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from daemon.cli import main
from store import stages
from store.db import open_db

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = {
    "step": 30,
    "total": 120,
    "loss": 2.3456,
    "tokens_per_s": 1234.0,
    "eta_s": 95.0,
    "phase": "train",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, port: int) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    path = tmp_path / "evergreen.toml"
    path.write_text(
        f'state_dir = "{state}"\n\n[serving]\nmode = "none"\n\n'
        f'[metrics]\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return path


def _running_stage(state: Path, progress: dict[str, object]) -> int:
    db = open_db(state / "evergreen.db")
    try:
        sid = stages.create(db, {"new_chunk_ids": []})
        stages.set_status(db, sid, stages.RUNNING)
        stages.update_progress(db, sid, progress)
        return sid
    finally:
        db.conn.close()


def test_status_shows_a_running_stage_progress(tmp_path: Path) -> None:
    cfg_file = _config(tmp_path, _free_port())
    sid = _running_stage(tmp_path / "state", PROGRESS)
    runner = CliRunner()
    result = runner.invoke(main, ["--config", str(cfg_file), "status", "--json"])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output)["last_stage"]
    assert last["id"] == sid and last["status"] == "running"
    assert last["progress"] == PROGRESS

    table = runner.invoke(main, ["--config", str(cfg_file), "status"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "step 30/120 (25%) · loss 2.346 · 1,234 tok/s · ETA 1m 35s" in table.output


def _scrape(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=5).text
    return {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def _wait_for_gauges(url: str, want: dict[str, float], timeout: float = 60.0) -> dict[str, float]:
    """Scrape until the gauges have the wanted values (the daemon refreshes every few s)."""
    deadline = time.monotonic() + timeout
    got: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            got = _scrape(url)
        except httpx.HTTPError:
            got = {}
        if all(got.get(k) == v for k, v in want.items()):
            return got
        time.sleep(0.5)
    raise AssertionError(f"gauges never reached {want}; last scrape: {got}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``evergreen serve`` as a real process on a free metrics port; (state dir, /metrics)."""
    port = _free_port()
    cfg_file = _config(tmp_path, port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(cfg_file), "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(ROOT),
    )
    try:
        yield tmp_path / "state", f"http://127.0.0.1:{port}/metrics"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0, (tmp_path / "daemon.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def test_metrics_follow_a_running_stage(daemon: tuple[Path, str]) -> None:
    state, url = daemon
    _wait_for_gauges(
        url, {"evergreen_stage_progress_ratio": 0.0, "evergreen_stage_tokens_per_second": 0.0}
    )
    sid = _running_stage(state, PROGRESS)
    _wait_for_gauges(
        url,
        {"evergreen_stage_progress_ratio": 0.25, "evergreen_stage_tokens_per_second": 1234.0},
    )
    db = open_db(state / "evergreen.db")
    try:
        stages.update_progress(db, sid, {**PROGRESS, "step": 90, "tokens_per_s": 900.0})
        _wait_for_gauges(
            url,
            {"evergreen_stage_progress_ratio": 0.75, "evergreen_stage_tokens_per_second": 900.0},
        )
        stages.set_status(db, sid, stages.FAILED, reason="test: the stage ended")
    finally:
        db.conn.close()
    _wait_for_gauges(
        url, {"evergreen_stage_progress_ratio": 0.0, "evergreen_stage_tokens_per_second": 0.0}
    )
