"""The model a stage trains: the base model plus a LoRA adapter, warm-started or new.

A stage continues from its plan's ``init_adapter`` (the parent adapter, or a configured
starting adapter) so knowledge accumulates across stages; only the first stage of a
track creates a fresh LoRA, on ``training.target_modules`` resolved for this model
(:mod:`~daemon.training.targets`: ``auto``, or a checked explicit list).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.config import TrainingConfig
from daemon.training.targets import resolve_targets
from store.contracts import StagePlan


@dataclass
class Loaded:
    """What training, evaluation and publishing share: model, tokenizer, device."""

    model: Any  # peft.PeftModel
    tok: Any  # transformers tokenizer
    dev: Any  # daemon.training.device.Device
    pad_id: int


def load(plan: StagePlan, hp: TrainingConfig, stage_id: int) -> Loaded:
    """Base model on the picked device (cuda/bf16 when there is one), with its adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from daemon.training.device import pick

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    dev = pick()
    torch.manual_seed(hp.seed + stage_id)  # LoRA init differs per stage, reproducibly
    tok = AutoTokenizer.from_pretrained(plan.base_model)
    model = AutoModelForCausalLM.from_pretrained(plan.base_model, dtype=dev.dtype)
    model.config.use_cache = False
    model.to(dev.device)  # type: ignore[arg-type]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Loaded(with_lora(model, plan.init_adapter, hp), tok, dev, pad_id)


def with_lora(model: Any, init_adapter: str, hp: TrainingConfig) -> Any:
    """``model`` wrapped with a trainable adapter: ``init_adapter`` if given, else new."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter:
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    cfg = LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=resolve_targets(model, hp.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)
