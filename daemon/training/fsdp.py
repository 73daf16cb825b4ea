"""FSDP for a stage under torchrun (``training.distributed = "fsdp"``): PyTorch's FSDP2.

DDP (:mod:`daemon.training.distributed`) keeps the whole model on every rank and
all-reduces the LoRA gradients. FSDP2 (``torch.distributed.fsdp.fully_shard``) shards
every parameter over the ranks, the frozen base weights included: each decoder layer is
one unit, all-gathered just before its forward and its backward and freed after, then
the root (embeddings, final norm, head). A rank holds 1/W of the weights plus the layer
in flight, so a base model that does not fit one device trains across W of them, at the
price of all-gathering the weights twice a micro-batch (DDP moves only LoRA gradients).
Frozen and trainable parameters share a unit: FSDP2 all-gathers both and
reduce-scatters only the gradients that exist.

The rest of the stage sees what it sees under DDP:

* gradients are reduce-scattered and averaged over the ranks as DDP averages them, so
  the loop's per-token loss scale is the same; only a step's last micro-batch syncs
  (:func:`gradient_sync`, DDP's ``no_sync``);
* checkpoints and the best weights hold full (unsharded) LoRA tensors gathered from every
  rank (:func:`full_trainable`), and the optimizer state is the full state dict of
  ``torch.distributed.checkpoint.state_dict``: rank 0 writes the files one process writes,
  and on resume every rank reads them back into its shard;
* after training, rank 0 evaluates and publishes with a plain model rebuilt from the base
  and the gathered LoRA weights (:func:`unsharded`): the code path of one process, so the
  adapter is PEFT's format. That needs the base model to fit rank 0's device for
  inference (no gradients, optimizer state or activations kept for backward).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from daemon.config import TrainingConfig
from daemon.training import checkpoint, lora
from daemon.training.distributed import Ranks
from daemon.training.report import say
from store.contracts import StagePlan


def shard(model: Any, ranks: Ranks) -> Any:
    """``model`` sharded in place over all ranks: each decoder layer, then the root."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(kind, (ranks.world,))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if ranks.main:
        say(f"FSDP: {len(layers)} decoder layers, then the root, sharded over {ranks.world} ranks")
    return model


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: the classes transformers will not split across devices
    (``_no_split_modules``, e.g. ``LlamaDecoderLayer``), else the longest ``ModuleList``."""
    import torch

    names: set[str] = set()
    for m in model.modules():
        found = getattr(m, "_no_split_modules", None)
        if found:
            names = set(found)
            break
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists: list[torch.nn.ModuleList] = [
        m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
    ]
    return list(max(lists, key=lambda m: sum(1 for _ in m))) if lists else []


@contextlib.contextmanager
def gradient_sync(model: Any, sync: bool) -> Iterator[None]:
    """Reduce-scatter gradients in this backward only if ``sync`` (accumulate otherwise)."""
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full(t: Any) -> Any:
    """A DTensor's full value (a collective: every rank calls it), else ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_trainable(model: Any) -> dict[str, Any]:
    """The trainable weights in full, on the CPU, on every rank (a collective)."""
    return {
        n: full(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def load_full(model: Any, weights: dict[str, Any]) -> None:
    """Load full trainable ``weights`` (every rank has them) into the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    params = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint has weights the model lacks: {missing[:3]}")
    set_model_state_dict(
        model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
    )


def optimizer_state(model: Any, opt: Any) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name, on rank 0's CPU (a collective;
    the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, opt, options=options)


def load_optimizer_state(model: Any, opt: Any, state: dict[str, Any]) -> None:
    """Load a full optimizer state (every rank has it) into this rank's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=options)


def unsharded(
    loaded: lora.Loaded, plan: StagePlan, hp: TrainingConfig, stage_id: int, weights: dict[str, Any]
) -> lora.Loaded:
    """A plain model for rank 0's evaluation and publishing: the sharded one is dropped,
    the base and the LoRA are loaded again as one process loads them, then ``weights``."""
    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fresh = lora.load(plan, hp, stage_id)
    checkpoint.load_trainable(fresh.model, weights)
    return fresh
