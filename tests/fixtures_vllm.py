"""Real vLLM CPU server fixtures (owned by the serving work).

``vllm_server`` starts one managed vLLM (the same :class:`ManagedVLLM` the daemon uses) on the
session's tiny seed model, once per pytest session, on a free port in 18100-18199, and stops
it (and its engine process) at the end. ``vllm_server2`` is a second, independent server,
started only by the tests that need two endpoints. ``serving_cfg`` is the config of the
state dir both serve adapters from; ``make_lora`` writes a real PEFT adapter into it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.serving.vllm import ManagedVLLM
from tests.fixtures_model import make_tiny_cfg

PORT_RANGE = range(18100, 18200)
STARTUP_TIMEOUT_S = 300.0


def free_port(skip: tuple[int, ...] = ()) -> int:
    for port in PORT_RANGE:
        if port in skip:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18100-18199")


def make_lora(
    cfg: Config,
    version: str,
    seed: int,
    *,
    rank: int = 8,
    register: bool = True,
    scale: float = 0.5,
) -> Path:
    """A real PEFT LoRA on the served base model, with random B so outputs change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from store import adapters
    from store.db import open_db

    base = cfg.resolved_base_model()
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj"]),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    out = cfg.adapters_dir / version
    peft_model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    if register:
        db = open_db(cfg.db_path)
        try:
            adapters.register(db, version, str(out), track=cfg.track)
        finally:
            db.conn.close()
    return out


@pytest.fixture(scope="session")
def serving_cfg(tmp_path_factory: pytest.TempPathFactory, tiny_seed_model: Path) -> Config:
    """State dir shared by the session's vLLM servers and swap tests."""
    state = tmp_path_factory.mktemp("serving-state")
    port = free_port()
    return make_tiny_cfg(
        state,
        tiny_seed_model,
        serving={"port": port, "max_lora_rank": 16, "max_loras": 4, "max_model_len": 512},
    )


def _start(cfg: Config) -> ManagedVLLM:
    server = ManagedVLLM(cfg)
    server.start()
    if not server.wait_healthy(STARTUP_TIMEOUT_S):
        tail = server.log_tail(40)
        server.stop()
        pytest.fail(f"vLLM did not start: {server.last_error}\n{tail}")
    return server


@pytest.fixture(scope="session")
def vllm_server(serving_cfg: Config) -> Iterator[ManagedVLLM]:
    """The session's managed vLLM CPU server (tiny seed model, LoRA on, plugin loaded)."""
    server = _start(serving_cfg)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server2(
    tmp_path_factory: pytest.TempPathFactory, serving_cfg: Config, tiny_seed_model: Path
) -> Iterator[ManagedVLLM]:
    """A second, independent server (own state dir, key and log) with max_lora_rank 8.

    The lower rank limit lets a test make exactly one endpoint refuse an adapter.
    """
    state = tmp_path_factory.mktemp("serving-state-2")
    cfg = make_tiny_cfg(
        state,
        tiny_seed_model,
        serving={
            "port": free_port(skip=(serving_cfg.serving.port,)),
            "max_lora_rank": 8,
            "max_loras": 4,
            "max_model_len": 512,
        },
        training={"lora_rank": 8},
    )
    server = _start(cfg)
    try:
        yield server
    finally:
        server.stop()
