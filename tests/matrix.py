"""One architecture family end to end: train a stage, promote it, serve it, check parity.

:func:`run_family` builds the family's tiny model (:mod:`tests.families`), starts a managed
vLLM CPU server on it (fp32, so its numbers are comparable with peft's) and, while that
server boots, runs one short stage through the real stage subprocess with a high learning
rate (so the adapter moves every targeted module noticeably). The candidate is promoted
through serving's own path (swap under the stable name, then the pointer), a completion is
asked for under the stable name, and the log-probs and greedy continuations vLLM returns
for the base model and under the stable name are compared with transformers + peft
(:mod:`tests.parity`). One server per family (a vLLM server serves one base model), used
for both the serving and the parity checks. Shared by ``tests/test_arch_matrix.py`` and
``benchmarks/parity.py``.
"""

from __future__ import annotations

import json
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.serving import promotion
from daemon.serving.adapters import BASE_VERSION
from daemon.serving.swap import Swapper
from daemon.serving.vllm import ManagedVLLM
from daemon.training import finish, spawn
from daemon.training import plan as plan_mod
from store import stages
from store.db import open_db
from tests import parity
from tests.families import build_family
from tests.fixtures_model import add_doc, make_tiny_cfg

STARTUP_TIMEOUT_S = 400.0  # a vLLM start takes 30 s on 2 quiet cores, minutes when loaded
TRAINING: dict[str, Any] = {
    "lora_rank": 16,
    "lora_alpha": 32,
    "learning_rate": 2e-2,  # high on purpose: a few steps move every module's LoRA
    "warmup_ratio": 0.0,
    "epochs": 1.0,
    "min_steps": 6,
    "max_steps": 6,
    "batch_tokens": 256,
    "max_seq_len": 128,
    "eval_every": 0,
    "checkpoint_every": 100_000,
    "general_mix": 0.0,
}
SERVING: dict[str, Any] = {
    "max_lora_rank": 16,
    "max_loras": 2,
    "max_model_len": 256,
    "kvcache_space_gib": 1,
    "extra_args": ["--dtype", "float32"],
}
DOC = [f"The vorpal number {i} hides in Zanthu{i}, said the keeper of lists." for i in range(8)]


@dataclass
class FamilyResult:
    family: str
    version: str = ""
    stable_text: str = ""
    base: parity.Parity = field(default_factory=parity.Parity)
    adapter: parity.Parity = field(default_factory=parity.Parity)
    zero: parity.Parity = field(default_factory=parity.Parity)  # stable name before promotion
    adapter_shift: float = 0.0  # max |log p| change the adapter makes (peft side)
    targets: list[str] = field(default_factory=list)  # what the stage's adapter targets
    seconds: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def sides(self) -> tuple[parity.Parity, ...]:
        """Base under its path, base under the stable name (zero adapter), the adapter."""
        return (self.base, self.zero, self.adapter)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.version)


def free_port() -> int:
    """A free port away from the shared fixtures' range (other sessions start servers)."""
    for port in random.sample(range(19000, 19500), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 19000-19499")


def family_cfg(work: Path, base: Path) -> Config:
    state = work / "state"
    state.mkdir(parents=True, exist_ok=True)
    return make_tiny_cfg(state, base, training=TRAINING, serving={**SERVING, "port": free_port()})


def train_stage(cfg: Config) -> int:
    """Plan and run one stage (the real subprocess); returns its id, evaluated."""
    db = open_db(cfg.db_path)
    try:
        add_doc(db, DOC, holdout=DOC[:2])
        sid = plan_mod.write_plan(cfg, db)
        if sid is None:
            raise RuntimeError("nothing to plan")
        rc, why = spawn.spawn_stage(cfg, sid)
        row = stages.get(db, sid) or {}
        if rc != 0 or row.get("status") != stages.EVALUATED:
            raise RuntimeError(f"stage {sid} ended {rc} ({why}): {row.get('reason')}")
        return sid
    finally:
        db.conn.close()


def promote(cfg: Config, swapper: Swapper, sid: int) -> str:
    """The stage's candidate made current through serving's path; returns the version."""
    db = open_db(cfg.db_path)
    try:
        result = finish.promote_stage(
            cfg,
            db,
            sid,
            "architecture matrix",
            promote=lambda v, r: promotion.promote(cfg, v, r, swapper=swapper, force=True),
        )
    finally:
        db.conn.close()
    if result.status != stages.PROMOTED:
        raise RuntimeError(f"stage {sid} not promoted: {result.status}: {result.reason}")
    return str(result.version)


def start_server(cfg: Config) -> ManagedVLLM:
    server = ManagedVLLM(cfg)
    server.start()
    return server


def wait_server(server: ManagedVLLM) -> None:
    if not server.wait_healthy(STARTUP_TIMEOUT_S):
        raise RuntimeError(f"vLLM did not start: {server.last_error}\n{server.log_tail(30)}")


def check_base(cfg: Config, server: ManagedVLLM, swapper: Swapper, res: FamilyResult) -> None:
    """The base model against peft without adapter: as vLLM serves it under its path, and
    under the stable name before any promotion (serving's zero adapter)."""
    from transformers import AutoTokenizer

    base_dir = cfg.resolved_base_model()
    tok = AutoTokenizer.from_pretrained(base_dir)
    ref = parity.load_reference(base_dir, None)
    res.base = parity.compare(server.url, server.api_key, str(base_dir), ref, tok, label="base")
    swapper.swap_to(BASE_VERSION, reason="architecture matrix: base first")
    name = cfg.serving.model_name
    res.zero = parity.compare(server.url, server.api_key, name, ref, tok, label="zero")


def check_adapter(cfg: Config, server: ManagedVLLM, version: str, res: FamilyResult) -> None:
    """The promoted adapter under the stable name against peft on the same adapter dir."""
    from transformers import AutoTokenizer

    base_dir = cfg.resolved_base_model()
    tok = AutoTokenizer.from_pretrained(base_dir)
    base_ref = parity.load_reference(base_dir, None)
    adapter_ref = parity.load_reference(base_dir, cfg.adapters_dir / version)
    name = cfg.serving.model_name
    res.adapter = parity.compare(
        server.url, server.api_key, name, adapter_ref, tok, label="adapter"
    )
    res.adapter_shift = parity.max_shift(base_ref, adapter_ref, tok)


def run_family(family: str, seed_model: Path, work: Path) -> FamilyResult:
    """Everything above for one family; failures land in ``error`` (one line + log tail)."""
    res = FamilyResult(family)
    t0 = time.monotonic()
    base = build_family(family, seed_model, work / "models" / family)
    cfg = family_cfg(work / family, base)
    server = start_server(cfg)  # boots while the stage trains
    swapper: Swapper | None = None
    try:
        sid = train_stage(cfg)
        res.seconds["stage"] = time.monotonic() - t0
        wait_server(server)
        res.seconds["serve"] = time.monotonic() - t0
        swapper = Swapper(cfg, [server.endpoint])
        check_base(cfg, server, swapper, res)
        res.version = promote(cfg, swapper, sid)
        conf = json.loads((cfg.adapters_dir / res.version / "adapter_config.json").read_text())
        res.targets = sorted(conf["target_modules"])
        res.stable_text = server.endpoint.completion(cfg.serving.model_name, "The vorpal")
        check_adapter(cfg, server, res.version, res)
    except Exception as exc:  # reported per family; the caller decides what fails
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        if swapper is not None:
            swapper.close()
        server.stop()
    res.seconds["total"] = time.monotonic() - t0
    return res
