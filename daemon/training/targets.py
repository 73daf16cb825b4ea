"""Which modules of a base model get LoRA weights: ``training.target_modules``.

``"auto"`` (the default) picks every linear layer inside the decoder blocks (the model's
``ModuleList`` of layers: attention and MLP), by leaf name, whatever the family calls them:
``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj`` (Llama, Qwen, Gemma,
Mistral, Granite, OLMo), ``qkv_proj, o_proj, gate_up_proj, down_proj`` (Phi-3's fused
projections), ``q_proj, k_proj, v_proj, out_proj, fc1, fc2`` (OPT) ... Embeddings and
``lm_head`` are never picked. vLLM serves LoRA on exactly these layers (its
``QKVParallelLinear``/``MergedColumnParallelLinear`` pack the separate q/k/v and gate/up
adapters itself); what it does not serve is left out: a mixture-of-experts router (a
linear layer with one output per expert).

An explicit list is used as given, and a name that matches no module is an error, not a
silent skip: a typo must not train a fraction of what was asked for.

Nothing here imports torch at module level: the daemon (which never imports torch) may
import the names; the functions are called where a model is loaded.
"""

from __future__ import annotations

from typing import Any

from daemon.training.report import StageFailed

AUTO = "auto"

# Leaf names of linear layers that vLLM never serves LoRA on, even inside a block.
_ROUTER_NAMES = frozenset({"gate", "router", "router_logits"})
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class TargetsError(StageFailed):
    """The configured LoRA targets do not fit this model (one clear line)."""


def decoder_blocks(model: Any) -> Any:
    """The model's ``ModuleList`` of decoder layers: the first one with
    ``config.num_hidden_layers`` entries, else the longest (ties: the first)."""
    import torch

    cfg: Any = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(cfg, "num_hidden_layers", None)
    lists = [m for _, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise TargetsError(f"{type(model).__name__} has no list of decoder layers")
    exact = [m for m in lists if len(m) == n_layers]
    return exact[0] if exact else max(lists, key=len)


def _is_linear(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    try:  # GPT-2 style models use transformers' Conv1D as their linear layers
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return isinstance(module, Conv1D)


def _expert_count(model: Any) -> int:
    cfg: Any = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in _EXPERT_COUNT_KEYS:
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return 0


def _is_router(leaf: str, module: Any, experts: int) -> bool:
    out = getattr(module, "out_features", None)
    return experts > 0 and (leaf in _ROUTER_NAMES or out == experts)


def auto_target_modules(model: Any) -> list[str]:
    """Leaf names of the linear layers of the decoder blocks, in first-seen order."""
    experts = _expert_count(model)
    names: list[str] = []
    for name, module in decoder_blocks(model).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name or not _is_linear(module) or _is_router(leaf, module, experts):
            continue
        if leaf not in names:
            names.append(leaf)
    if not names:
        raise TargetsError(f"{type(model).__name__} has no linear layers in its decoder blocks")
    return names


def resolve_targets(model: Any, configured: str | list[str]) -> list[str]:
    """The module names to give peft: ``"auto"`` resolved, or the checked explicit list."""
    if configured == AUTO:
        return auto_target_modules(model)
    if isinstance(configured, str) or not configured:
        raise TargetsError(
            f"training.target_modules must be {AUTO!r} or a non-empty list of module names,"
            f" got {configured!r}"
        )
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [t for t in configured if t not in present]
    if missing:
        raise TargetsError(
            f"training.target_modules: {', '.join(missing)} match no module of"
            f" {type(model).__name__} (auto would pick: {', '.join(auto_target_modules(model))})"
        )
    return list(configured)


def targets_for_dir(base_model: str, configured: str | list[str] = AUTO) -> list[str]:
    """:func:`resolve_targets` for a model directory, built on the meta device (no weights
    are read, so it is quick even for a large model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    return resolve_targets(model, configured)
