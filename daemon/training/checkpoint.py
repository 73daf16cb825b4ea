"""Resumable stage checkpoints, pickle-free.

Trainable (LoRA) weights go to safetensors; optimizer/scheduler/RNG state is a dict of
tensors and plain numbers written with ``torch.save`` and read back with
``weights_only=True`` (no arbitrary code on load). The checkpoint dir is replaced
atomically, so a SIGKILL at any moment leaves either the previous or the new one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from daemon.training import fsutil

CKPT = "checkpoint"


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, weights: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint has weights the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)


def save(
    stage_dir: Path,
    weights: dict[str, Any],
    best: dict[str, Any] | None,
    state: dict[str, Any],
) -> None:
    """Write ``weights`` (the trainable tensors, in full), ``best`` and ``state``."""
    import torch
    from safetensors.torch import save_file

    final = stage_dir / CKPT
    tmp = fsutil.make_temp_dir(final)
    try:
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            str(tmp / "trainable.safetensors"),
        )
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        torch.save(state, tmp / "state.pt")
        fsutil.publish_dir(tmp, final, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(stage_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]] | None:
    """(trainable weights, best weights or None, state) of the last checkpoint, or None."""
    import torch
    from safetensors.torch import load_file

    d = stage_dir / CKPT
    if not (d / "state.pt").is_file():
        return None
    weights = load_file(str(d / "trainable.safetensors"))
    best = load_file(str(d / "best.safetensors")) if (d / "best.safetensors").is_file() else None
    state = torch.load(d / "state.pt", weights_only=True)
    return weights, best, state
