"""Serving safety checks that need no vLLM: paths, weight formats, keys, endpoints."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from daemon.config import Config
from daemon.serving import promotion
from daemon.serving.adapters import (
    AdapterRejected,
    adapter_path,
    ensure_zero_adapter,
    validate_adapter_dir,
)
from daemon.serving.apikey import load_or_create_api_key
from daemon.serving.client import InsecureEndpointError, VLLMClient, is_loopback
from daemon.serving.swap import SwapError
from daemon.serving.vllm import ManagedVLLM
from store import adapters, events
from store.db import open_db
from tests.fixtures_model import make_tiny_cfg


def write_adapter(path: Path, rank: int = 8) -> Path:
    path.mkdir(parents=True)
    conf = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(conf))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(rank, 8),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, rank),
        },
        str(path / "adapter_model.safetensors"),
    )
    return path


def test_good_adapter_passes(cfg: Config) -> None:
    path = write_adapter(cfg.adapters_dir / "v0001")
    assert adapter_path(cfg, "v0001") == path.resolve()
    assert validate_adapter_dir(cfg, path)["r"] == 8


@pytest.mark.parametrize("version", ["../outside", "v1/../../x", "/etc", "", ".hidden", "a b"])
def test_version_names_cannot_escape(cfg: Config, version: str) -> None:
    with pytest.raises(AdapterRejected):
        adapter_path(cfg, version)


def test_symlinked_version_dir_outside_state_refused(cfg: Config, tmp_path: Path) -> None:
    outside = write_adapter(tmp_path / "elsewhere")
    cfg.adapters_dir.mkdir(parents=True)
    (cfg.adapters_dir / "v0002").symlink_to(outside)
    with pytest.raises(AdapterRejected, match="outside the state dir"):
        adapter_path(cfg, "v0002")


def test_symlinked_file_outside_state_refused(cfg: Config, tmp_path: Path) -> None:
    path = write_adapter(cfg.adapters_dir / "v0003")
    (tmp_path / "secret").write_text("x")
    (path / "extra.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(AdapterRejected, match="outside the state dir"):
        validate_adapter_dir(cfg, path)


@pytest.mark.parametrize("name", ["adapter_model.bin", "optimizer.pt", "x.pth", "w.pkl", "c.ckpt"])
def test_pickle_weights_refused(cfg: Config, name: str) -> None:
    path = write_adapter(cfg.adapters_dir / "v0004")
    torch.save({"w": torch.zeros(2)}, path / name)
    with pytest.raises(AdapterRejected, match="pickle"):
        validate_adapter_dir(cfg, path)


def test_only_safetensors_accepted(cfg: Config) -> None:
    path = write_adapter(cfg.adapters_dir / "v0005")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterRejected, match="missing"):
        validate_adapter_dir(cfg, path)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_safetensors_refused(cfg: Config, keep: int) -> None:
    path = write_adapter(cfg.adapters_dir / "v0006")
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(AdapterRejected, match=r"safetensors|truncated"):
        validate_adapter_dir(cfg, path)


def test_rank_above_server_limit_refused(cfg: Config) -> None:
    path = write_adapter(cfg.adapters_dir / "v0007", rank=2 * cfg.serving.max_lora_rank)
    with pytest.raises(AdapterRejected, match="max_lora_rank"):
        validate_adapter_dir(cfg, path)


def test_not_lora_refused(cfg: Config) -> None:
    path = write_adapter(cfg.adapters_dir / "v0008")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 8}))
    with pytest.raises(AdapterRejected, match="LoRA"):
        validate_adapter_dir(cfg, path)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_non_loopback_endpoint_needs_key() -> None:
    with pytest.raises(InsecureEndpointError, match="API key"):
        VLLMClient("http://10.0.0.5:8000")
    VLLMClient("http://10.0.0.5:8000", "k").close()
    VLLMClient("http://127.0.0.1:8000").close()


def test_managed_non_loopback_bind_needs_configured_key(state_dir: Path) -> None:
    cfg = make_tiny_cfg(state_dir, state_dir / "model", serving={"host": "0.0.0.0"})
    with pytest.raises(InsecureEndpointError, match="api_key"):
        ManagedVLLM(cfg)


def test_api_key_generated_once_private(cfg: Config) -> None:
    key = load_or_create_api_key(cfg)
    path = cfg.state_path / "vllm-api-key"
    assert len(key) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_api_key(cfg) == key


def test_managed_command_and_env(cfg: Config) -> None:
    server = ManagedVLLM(cfg)
    cmd = server.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == str(cfg.serving.max_lora_rank)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert server.api_key not in " ".join(cmd)  # the key travels in the env, not in ps
    env = server.environment()
    assert env["VLLM_API_KEY"] == server.api_key
    assert "evergreen" in env["VLLM_PLUGINS"].split(",")
    assert not any(k.startswith("VLLM_SERVER_DEV") for k in env if k not in os.environ)


def test_managed_vllm_runs_its_model_in_the_engine_process(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker process of its own (a cold start ~20 s shorter); an operator's choice in
    the daemon's environment still wins."""
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert ManagedVLLM(cfg).environment()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert ManagedVLLM(cfg).environment()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_cli_promote_without_running_vllm_moves_pointer(cfg: Config) -> None:
    write_adapter(cfg.adapters_dir / "v0001")
    write_adapter(cfg.adapters_dir / "v0002")
    db = open_db(cfg.db_path)
    try:
        adapters.register(db, "v0001", str(cfg.adapters_dir / "v0001"))
        adapters.register(db, "v0002", str(cfg.adapters_dir / "v0002"))
    finally:
        db.conn.close()
    msg = promotion.promote(cfg, "v0001", "test").message
    assert "reconcile" in msg
    promotion.promote(cfg, "v0002", "test")
    assert "v0001" in promotion.rollback(cfg, None).message
    db = open_db(cfg.db_path)
    try:
        assert adapters.current(db) == "v0001"
        moves = events.recent(db, kind_prefix="adapter.current")
        assert [e["subject"] for e in moves] == ["v0001", "v0002", "v0001"]
    finally:
        db.conn.close()


def test_cli_promote_refuses_unknown_or_bad(cfg: Config) -> None:
    with pytest.raises(SwapError, match="unknown"):
        promotion.promote(cfg, "v0099", "test")
    path = write_adapter(cfg.adapters_dir / "v0003")
    (path / "adapter_model.bin").write_bytes(b"x")
    db = open_db(cfg.db_path)
    try:
        adapters.register(db, "v0003", str(path))
    finally:
        db.conn.close()
    with pytest.raises(SwapError, match="pickle"):
        promotion.promote(cfg, "v0003", "test")
    db = open_db(cfg.db_path)
    try:
        assert adapters.current(db) is None
    finally:
        db.conn.close()


@pytest.mark.slow
def test_zero_adapter_is_zero_and_valid(tiny_cfg: Config) -> None:
    from safetensors.torch import load_file

    path = ensure_zero_adapter(tiny_cfg)
    assert path == ensure_zero_adapter(tiny_cfg)
    conf = validate_adapter_dir(tiny_cfg, path)
    assert conf["base_model_name_or_path"] == str(tiny_cfg.resolved_base_model())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert tensors and all(float(t.abs().sum()) == 0.0 for t in tensors.values())
    assert any("lora_B" in k for k in tensors)
