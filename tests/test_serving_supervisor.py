"""ManagedVLLM process handling with real child processes standing in for vLLM.

vLLM itself is exercised in test_serving_vllm.py; here a small Python child plays its part
(an API server that forks an "engine" and never answers /health, or one that crashes at
once), so group killing and restart backoff are checked in seconds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.serving import vllm as vllm_mod
from daemon.serving.vllm import ManagedVLLM
from tests.fixtures_model import make_tiny_cfg
from tests.fixtures_vllm import free_port

FORKING_SERVER = """
import os, subprocess, sys, time
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(str(engine.pid))
time.sleep(300)
"""


class FakeVLLM(ManagedVLLM):
    """ManagedVLLM whose child is a given Python script instead of vLLM."""

    script = ""
    extra: tuple[str, ...] = ()

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, *self.extra]


@pytest.fixture
def fake_cfg(state_dir: Path) -> Config:
    model = state_dir / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return make_tiny_cfg(state_dir, model, serving={"port": free_port()})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_stop_kills_engine_child_too(fake_cfg: Config, tmp_path: Path) -> None:
    pid_file = tmp_path / "engine.pid"
    server = FakeVLLM(fake_cfg)
    server.script, server.extra = FORKING_SERVER, (str(pid_file),)
    server.start()
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    engine = int(pid_file.read_text())
    assert server.proc is not None
    api = server.proc.pid
    assert _alive(engine) and _alive(api)
    server.stop(grace=2)
    assert not _alive(api)
    assert not _alive(engine)
    assert server.proc is None and not server.up
    assert "starting vLLM" in server.log_tail()


def test_crashing_server_is_restarted_with_backoff(
    fake_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_mod, "BACKOFF_INITIAL_S", 0.05)
    server = FakeVLLM(fake_cfg)
    server.script = "import sys; sys.exit(3)"
    server.start()
    assert server.wait_healthy(timeout=10) is False
    assert "exited (code 3)" in server.last_error
    backoffs: list[float] = []
    deadline = time.monotonic() + 30
    while server.restarts < 3 and time.monotonic() < deadline:
        assert server.check() is False  # never healthy, so never "restarted and up"
        backoffs.append(server._backoff)
        time.sleep(0.02)
    assert server.restarts == 3
    distinct = sorted(set(backoffs))
    assert distinct[:3] == [0.1, 0.2, 0.4]  # doubles after every crash
    server.stop(grace=1)
    assert server.check() is False  # stopped: no more restarts
    assert server.restarts == 3


def test_port_in_use_is_a_clear_error(fake_cfg: Config) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", fake_cfg.serving.port))
        s.listen()
        server = FakeVLLM(fake_cfg)
        server.script = "pass"
        with pytest.raises(vllm_mod.VLLMError, match="already in use"):
            server.start()


def test_missing_model_is_a_clear_error(state_dir: Path) -> None:
    cfg = make_tiny_cfg(state_dir, state_dir / "nope", serving={"port": free_port()})
    with pytest.raises(vllm_mod.VLLMError, match="no model"):
        ManagedVLLM(cfg).start()


def test_vllm_left_by_a_killed_daemon_is_replaced(fake_cfg: Config, tmp_path: Path) -> None:
    """kill -9 of the daemon orphans its vLLM; the next daemon's start() ends that group."""
    pid_file = tmp_path / "engine.pid"
    first = FakeVLLM(fake_cfg)
    first.script, first.extra = FORKING_SERVER, (str(pid_file), "vllm-stand-in")
    first.start()
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert first.proc is not None
    orphan_api, orphan_engine = first.proc.pid, int(pid_file.read_text())
    first.proc = None  # the daemon that owned it is gone; nothing of it is reused

    second = FakeVLLM(fake_cfg)
    second.script, second.extra = "import time; time.sleep(300)", ("vllm-stand-in",)
    try:
        second.start()
        assert not _alive(orphan_api)
        assert not _alive(orphan_engine)
        assert second.proc is not None and _alive(second.proc.pid)
    finally:
        second.stop(grace=2)
    assert not (fake_cfg.state_path / "vllm.pgid").exists()


def test_unrelated_process_group_is_left_alone(fake_cfg: Config) -> None:
    """A stale pgid file pointing at something that is not vLLM kills nothing."""
    import subprocess

    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        (fake_cfg.state_path / "vllm.pgid").write_text(f"{other.pid}\n")
        server = FakeVLLM(fake_cfg)
        server.script = "import time; time.sleep(300)"
        server.start()
        server.stop(grace=2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
