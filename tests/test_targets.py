"""LoRA target modules: ``auto`` per family, explicit lists checked, the config key."""

from __future__ import annotations

from typing import Any

import pytest

from daemon import config as config_mod
from daemon.config import ConfigError, TrainingConfig
from daemon.training.targets import TargetsError, auto_target_modules, resolve_targets

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1}


def _meta(name: str, **extra: Any) -> Any:
    """A tiny model of family ``name`` on the meta device (no weights allocated)."""
    import torch
    import transformers as tf

    cls = getattr(tf, name)
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(cls(**extra))


@pytest.mark.parametrize(
    ("config_class", "expected"),
    [
        ("LlamaConfig", LLAMA),
        ("Qwen3Config", LLAMA),
        ("Gemma2Config", LLAMA),
        ("Phi3Config", ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]),
    ],
)
def test_auto_picks_every_linear_of_the_blocks(config_class: str, expected: list[str]) -> None:
    model = _meta(config_class, **SHAPE, **HEADS, eos_token_id=2)
    assert sorted(auto_target_modules(model)) == sorted(expected)


def test_auto_on_opt_never_picks_lm_head_or_embeddings() -> None:
    model = _meta(
        "OPTConfig",
        vocab_size=256,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        pad_token_id=0,
    )
    names = auto_target_modules(model)
    assert sorted(names) == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    assert "lm_head" not in names and "embed_tokens" not in names


def test_explicit_list_is_checked() -> None:
    model = _meta("LlamaConfig", **SHAPE, **HEADS)
    assert resolve_targets(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert resolve_targets(model, "auto") == LLAMA
    with pytest.raises(TargetsError, match="qkv_proj match no module") as err:
        resolve_targets(model, ["q_proj", "qkv_proj"])
    assert "auto would pick: q_proj" in str(err.value)


def test_config_key_defaults_to_auto_and_rejects_empty() -> None:
    assert TrainingConfig().target_modules == "auto"
    assert TrainingConfig(target_modules=["q_proj"]).target_modules == ["q_proj"]
    for bad in ([], "all", [""]):
        with pytest.raises(ConfigError, match=r"training\.target_modules"):
            config_mod.from_dict({"training": {"target_modules": bad}})


def test_zero_adapter_sits_on_a_layer_each_family_has() -> None:
    """Serving's zero adapter (the stable name before any promotion) fits Phi-3 too."""
    from daemon.serving.adapters import _zero_targets

    heads = {**SHAPE, **HEADS, "eos_token_id": 2}
    assert _zero_targets(_meta("LlamaConfig", **heads)) == ("q_proj", "v_proj")
    assert _zero_targets(_meta("Phi3Config", **heads)) == ("qkv_proj",)
