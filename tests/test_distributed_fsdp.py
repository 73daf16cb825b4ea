"""FSDP stages under torchrun (CPU, gloo, 2 ranks) on the tiny model: real ranks, real
store, real adapter; the same plans as the DDP tests in ``test_distributed_stage``."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from daemon.training import runner
from store import adapters, stages
from store.db import open_db
from tests.fixtures_model import add_doc
from tests.test_distributed_stage import FACTS, _cfg, _one_stage, _promote, kill_rank1_mid_stage

pytestmark = pytest.mark.slow


def test_fsdp_ranks_match_one_process_and_publish_a_peft_adapter(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one, one_path = _one_stage(_cfg(tmp_path / "one", tiny_seed_model, "local"))
    two, path = _one_stage(_cfg(tmp_path / "two", tiny_seed_model, "torchrun", distributed="fsdp"))
    t1, t2 = one["training"], two["training"]
    assert t2["processes"] == 2 and t2["distributed"] == "fsdp" and t1["processes"] == 1
    assert t2["steps"] == t1["steps"] and t2["tokens_trained"] == t1["tokens_trained"]
    base, l1, l2 = (
        one["baseline"]["new_loss"],
        one["candidate"]["new_loss"],
        two["candidate"]["new_loss"],
    )
    assert l1 < base - 0.05  # it learned
    assert abs(l2 - l1) / l1 < 0.05, (l1, l2)  # the holdout loss of two ranks within 5 %
    # the adapter is what one process publishes: PEFT's files, safetensors only, the same
    # tensors (full, not a rank's shard), float32
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in one_path.iterdir())
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    w1, w2 = (load_file(str(p / "adapter_model.safetensors")) for p in (one_path, path))
    assert {k: v.shape for k, v in w2.items()} == {k: v.shape for k, v in w1.items()}
    assert all(v.dtype == torch.float32 for v in w2.values())
    acfg1, acfg2 = (json.loads((p / "adapter_config.json").read_text()) for p in (one_path, path))
    for acfg in (acfg1, acfg2):  # PEFT keeps the target modules as a set
        acfg["target_modules"] = sorted(acfg["target_modules"])
    assert acfg2 == acfg1
    assert json.loads((path / "manifest.json").read_text())["training"]["distributed"] == "fsdp"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_seed_model), path)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(w2)
    assert any(float(p.abs().sum()) > 0 for n, p in loaded.items() if "lora_B" in n)  # trained
    log = (path.parent.parent / "stages" / "1" / "stage.log").read_text()
    assert "rank 1/2" in log and "Traceback" not in log.split("published")[0]
    assert "FSDP: 2 decoder layers, then the root, sharded over 2 ranks" in log


def test_a_stopped_fsdp_stage_checkpoints_full_weights_and_resumes(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, tiny_seed_model, "torchrun", distributed="fsdp", epochs=30.0, eval_every=2)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS[:6], holdout=FACTS[6:])
    stop = threading.Event()

    def on_progress(msg: dict) -> None:
        if (msg.get("step") or 0) >= 2:
            stop.set()

    res = runner.run_stage(cfg, db, promote=_promote(cfg), on_progress=on_progress, stop_event=stop)
    assert res.status == "interrupted" and res.stage_id is not None, res
    row = stages.get(db, res.stage_id)
    assert row is not None and row["status"] == "running"
    ckpt = cfg.stages_dir / str(res.stage_id) / "checkpoint"
    assert (ckpt / "state.pt").is_file()
    # the checkpoint holds the whole LoRA (gathered from both ranks), as one process's does
    weights = load_file(str(ckpt / "trainable.safetensors"))
    rank = cfg.training.lora_rank
    a = [v for k, v in weights.items() if "lora_A" in k]
    assert a and all(v.shape[0] == rank for v in a)
    assert (ckpt / "best.safetensors").is_file()  # eval_every = 2: best weights, in full
    (out,) = runner.resume_or_fail_running(cfg, db, promote=_promote(cfg))
    assert out.status == "promoted", out
    t = out.metrics["training"]
    assert t["resumed_from_step"] >= 2
    assert t["steps"] == t["total_steps"] or t["stopped_early"], t
    assert out.metrics["candidate"]["new_loss"] < out.metrics["baseline"]["new_loss"] - 0.05
    db.conn.close()


def test_a_killed_fsdp_rank_fails_the_stage_cleanly(tmp_path: Path, tiny_seed_model: Path) -> None:
    cfg = _cfg(tmp_path, tiny_seed_model, "torchrun", distributed="fsdp", epochs=400.0)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS[:6], holdout=FACTS[6:])
    res = kill_rank1_mid_stage(cfg, db)  # rank 0 waits in an all-gather that never ends
    assert res.status == "failed", res
    row = stages.get(db, 1)
    assert row is not None and row["status"] == "failed" and row["reason"]
    assert adapters.list_adapters(db, "default") == []
    assert not (cfg.adapters_dir / "v0001").exists()
    db.conn.close()
