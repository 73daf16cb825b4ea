"""Secrets and the plugin's guard without vLLM: private state files, request classes, the
batch gate's ordering, the admin secret in the managed server's environment."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.private_files import mkdir_private, private_umask, write_private
from daemon.service import Service
from daemon.serving.apikey import (
    admin_secret_path,
    load_or_create_admin_secret,
    load_or_create_api_key,
)
from daemon.serving.vllm import ManagedVLLM
from daemon.serving.vllm_guard import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    BatchGate,
    admin_secret,
    is_admin_path,
    normal_path,
    wants_prompt_logprobs,
)
from store.db import open_db, transaction


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_state_files_are_private_whatever_the_umask(cfg: Config, umask_022: None) -> None:
    key = load_or_create_api_key(cfg)
    secret = load_or_create_admin_secret(cfg)
    assert key != secret and len(secret) >= 32
    assert load_or_create_admin_secret(cfg) == secret  # generated once
    assert mode(cfg.state_path / "vllm-api-key") == 0o600
    assert mode(admin_secret_path(cfg)) == 0o600
    effective = Service(cfg, training=False)._write_effective_config()
    assert mode(effective) == 0o600
    db = open_db(cfg.db_path)
    try:
        with transaction(db):
            db.execute("CREATE TABLE IF NOT EXISTS t (x)")
            db.execute("INSERT INTO t VALUES (1)")
        for suffix in ("", "-wal", "-shm"):
            assert mode(Path(f"{cfg.db_path}{suffix}")) == 0o600, suffix
    finally:
        db.conn.close()
    mkdir_private(cfg.state_path / "a" / "b")
    assert mode(cfg.state_path / "a") == 0o700
    assert mode(cfg.state_path / "a" / "b") == 0o700
    write_private(cfg.state_path / "a" / "f", "x")
    assert mode(cfg.state_path / "a" / "f") == 0o600


def test_private_umask_covers_what_the_daemon_and_children_create(
    tmp_path: Path, umask_022: None
) -> None:
    old = private_umask()
    try:
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "adapter") == 0o700
    assert mode(tmp_path / "adapter" / "adapter_model.safetensors") == 0o600


def test_managed_server_gets_the_admin_secret_in_its_env(cfg: Config) -> None:
    server = ManagedVLLM(cfg)
    assert server.admin_secret and server.admin_secret != server.api_key
    assert server.admin_secret not in " ".join(server.command())
    assert server.environment()[SECRET_ENV] == server.admin_secret


def test_plugin_reads_the_secret_from_env_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    assert admin_secret() == ""  # none configured: admin routes are refused
    monkeypatch.setenv(SECRET_ENV, "s1")
    assert admin_secret() == "s1"
    (tmp_path / "secret").write_text("s2\n")
    monkeypatch.setenv(SECRET_FILE_ENV, str(tmp_path / "secret"))
    assert admin_secret() == "s2"
    monkeypatch.setenv(SECRET_FILE_ENV, str(tmp_path / "missing"))
    assert admin_secret() == ""


@pytest.mark.parametrize(
    ("path", "admin"),
    [
        ("/v1/load_lora_adapter", True),
        ("//v1//load_lora_adapter/", True),
        ("/v1/unload_lora_adapter", True),
        ("/v1/evergreen/alias", True),
        ("/adapters", True),
        ("/adapters/evergreen-v0001", True),
        ("/v1/evergreen/aliases", False),
        ("/v1/completions", False),
        ("/adaptersx", False),
    ],
)
def test_admin_paths(path: str, admin: bool) -> None:
    assert is_admin_path(normal_path({"path": path, "root_path": ""})) is admin


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"echo": True, "logprobs": 0}, True),
        ({"echo": True, "logprobs": 5}, True),
        ({"prompt_logprobs": 0}, True),
        ({"sampling_params": {"prompt_logprobs": 1}}, True),
        ({"echo": True, "logprobs": True, "top_logprobs": 2}, True),  # chat
        ({"echo": True}, False),
        ({"logprobs": 3}, False),  # generated tokens only
        ({"echo": True, "logprobs": None}, False),
        ({"echo": True, "logprobs": False}, False),
    ],
)
def test_prompt_logprobs_requests(body: dict, expected: bool) -> None:
    assert wants_prompt_logprobs(body) is expected


def test_batch_gate_never_mixes_prompt_logprobs_with_lora() -> None:
    async def scenario() -> list[str]:
        gate = BatchGate()
        log: list[str] = []
        release = {name: asyncio.Event() for name in ("lora1", "plp", "lora2", "base")}

        def request(name: str) -> object:
            async def call() -> None:
                log.append(f"start {name}")
                await release[name].wait()
                log.append(f"end {name}")

            return call

        async def settle() -> None:
            for _ in range(20):
                await asyncio.sleep(0)

        lora1 = asyncio.create_task(gate.run(True, False, request("lora1")))
        await settle()
        plp = asyncio.create_task(gate.run(False, True, request("plp")))
        await settle()
        lora2 = asyncio.create_task(gate.run(True, False, request("lora2")))
        base = asyncio.create_task(gate.run(False, False, request("base")))
        await settle()
        assert log == ["start lora1", "start base"]  # plp waits; lora2 is held back
        release["lora1"].set()
        await settle()
        assert "start plp" in log and "start lora2" not in log
        release["plp"].set()
        await settle()
        assert "start lora2" in log
        release["lora2"].set()
        release["base"].set()
        await asyncio.gather(lora1, plp, lora2, base)
        return log

    log = asyncio.run(scenario())
    # Never a prompt-logprobs request in flight together with a LoRA request.
    running: set[str] = set()
    for entry in log:
        what, name = entry.split()
        if what == "start":
            running.add(name)
        else:
            running.discard(name)
        assert not ("plp" in running and running & {"lora1", "lora2"}), log


def test_reconcile_spots_a_pinned_name_serving_other_weights(cfg: Config) -> None:
    from daemon.serving.client import VLLMClient
    from daemon.serving.reconcile import _pinned_problem
    from daemon.serving.swap import Swapper
    from tests.test_serving_unit import write_adapter

    v1, v2 = (write_adapter(cfg.adapters_dir / v) for v in ("v0001", "v0002"))
    sw = Swapper(cfg, [VLLMClient("http://127.0.0.1:9")])
    try:
        right = {"target": "evergreen-v0001", "path": str(v1)}
        assert _pinned_problem(sw, "evergreen-v0001", right) == ""
        moved = {"target": "evergreen-v0001", "path": str(v2)}
        assert "serves" in _pinned_problem(sw, "evergreen-v0001", moved)
        aliased = {"target": "evergreen-v0002", "path": str(v2)}
        assert "alias" in _pinned_problem(sw, "evergreen-v0001", aliased)
        assert _pinned_problem(sw, "evergreen-v0009", right)  # no such version dir
    finally:
        sw.close()
