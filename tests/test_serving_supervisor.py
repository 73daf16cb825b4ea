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
