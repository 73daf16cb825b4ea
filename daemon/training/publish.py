"""Publishing a stage's adapter: ``adapters/<version>/`` appears whole or not at all.

The adapter (safetensors only) and its ``manifest.json`` are written to a temp dir,
fsynced, and renamed into place, so vLLM, the swapper and a crashed-then-resumed stage
never see half an adapter. Its weights are float32 whatever the stage computed in (a
stage on a bf16 GPU, see :mod:`daemon.devices`): vLLM loads float32 LoRA weights into
any serving dtype, and a warm start from it loses nothing. The manifest records everything needed to know where the
adapter came from: lineage, data, recipe, training stats and evaluation metrics.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.training import fsutil
from daemon.training.report import StageFailed
from store import adapters
from store.contracts import StagePlan

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PEFT writes and vLLM reads


def publish(
    db: sqlite_utils.Database,
    model: Any,
    plan: StagePlan,
    stage_id: int,
    *,
    data_stats: dict[str, Any],
    train_stats: dict[str, Any],
    metrics: dict[str, Any],
) -> Path:
    """Write the adapter to a temp dir, fsync, rename into ``plan.output_dir``."""
    final = Path(plan.output_dir)
    fsutil.remove_stale_temps(final.parent)
    if final.exists():
        if adapters.get(db, plan.output_version) is not None:
            raise StageFailed(f"adapter {final.name} already exists and is registered")
        shutil.rmtree(final)  # a previous attempt of this stage died after publishing
    tmp = fsutil.make_temp_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        as_float32(tmp / ADAPTER_WEIGHTS)
        acfg = _point_at_base(tmp / "adapter_config.json", plan.base_model)
        info = {"data_stats": data_stats, "training": train_stats, "metrics": metrics}
        fsutil.write_json(tmp / "manifest.json", manifest(plan, stage_id, acfg, **info))
        fsutil.publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def as_float32(path: Path) -> None:
    """Rewrite the safetensors file at ``path`` with every floating tensor in float32."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    if all(t.dtype == torch.float32 or not t.is_floating_point() for t in tensors.values()):
        return
    cast = {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
    save_file(cast, str(path), metadata={"format": "pt"})


def _point_at_base(cfg_path: Path, base_model: str) -> dict[str, Any]:
    """Record the plan's base model in ``adapter_config.json`` (vLLM and PEFT read it)."""
    acfg: dict[str, Any] = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = base_model
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True))
    return acfg


def manifest(
    plan: StagePlan,
    stage_id: int,
    acfg: dict[str, Any],
    *,
    data_stats: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The adapter's ``manifest.json``."""
    return {
        "version": plan.output_version,
        "track": plan.track,
        "stage_id": stage_id,
        "parent_version": plan.parent_version,
        "init_adapter": plan.init_adapter or None,
        "base_model": plan.base_model,
        "base_model_sha256": plan.base_model_sha256 or None,
        "data": {
            "new_chunk_ids": plan.new_chunk_ids,
            "replay_chunk_ids": plan.replay_chunk_ids,
            "new_sha256": plan.new_sha256 or None,
            "replay_sha256": plan.replay_sha256 or None,
            **data_stats,
        },
        "hparams": plan.hparams,
        "lora": {
            "r": acfg.get("r"),
            "alpha": acfg.get("lora_alpha"),
            "target_modules": acfg.get("target_modules"),
        },
        "training": training,
        "metrics": metrics,
        "created_at": time.time(),
    }
