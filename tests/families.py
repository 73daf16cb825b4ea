"""Tiny random-init models of the architecture families vLLM serves LoRA on.

Each family is built locally from its transformers config (no download): the tiny seed
model's tokenizer (2048 tokens), 2 decoder layers, hidden size 64, 2 query heads of 32
(vLLM's CPU attention wants a head size of 32 or 64) and 1 KV head where the family has
grouped-query attention: about 0.2M parameters. The weights are drawn with a large
``initializer_range`` so the next-token distribution is peaked (logits spread over ~1.6
nats rather than 0.2): greedy decoding then never hinges on a near-tie that fp32
rounding could flip. Saved as safetensors with the tokenizer, the layout a user's
checkpoint has. Shared by ``tests/test_arch_matrix.py`` and ``benchmarks/parity.py``.

vLLM 0.32 refuses LoRA on the architectures in :data:`REFUSED` (no ``SupportsLoRA``
model class); the README lists them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 2, 1, 32
INIT_STD = 0.2

# Architectures this vLLM has no LoRA for: their model class is not SupportsLoRA, so
# the server refuses to start with --enable-lora (vllm 0.32: model_executor/models/*.py).
REFUSED = {
    "GPT2LMHeadModel": "gpt2",
    "GPTJForCausalLM": "gpt_j",
    "BloomForCausalLM": "bloom",
    "FalconForCausalLM": "falcon",
    "StableLmForCausalLM": "stablelm",
    "OrionForCausalLM": "orion",
}


# How close vLLM's log-probs must be to peft's (fp32 on both sides). Measured: at most
# 1.7e-5 on every family but Gemma 2 (1.2e-2, greedy still identical). That gap is its
# attention logit soft-capping (tanh) in vLLM's CPU attention kernel: the same Gemma 2
# with attn_logit_softcapping off (final soft-capping still on) matches to 2.9e-6.
BOUND = 1e-3
BOUNDS = {"gemma2": 3e-2}


def bound(name: str) -> float:
    """The parity bound for family ``name``."""
    return BOUNDS.get(name, BOUND)


def _common(vocab: int, tok: Any) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 512,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
    }


def _decoder(vocab: int, tok: Any) -> dict[str, Any]:
    """The keys Llama-shaped families share."""
    return {
        **_common(vocab, tok),
        "intermediate_size": INTERMEDIATE,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "initializer_range": INIT_STD,
    }


def _llama(vocab: int, tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_decoder(vocab, tok))


def _qwen2(vocab: int, tok: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_decoder(vocab, tok))


def _qwen3(vocab: int, tok: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_decoder(vocab, tok))


def _gemma2(vocab: int, tok: Any) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(**_decoder(vocab, tok), query_pre_attn_scalar=HEAD_DIM, sliding_window=64)


def _gemma3(vocab: int, tok: Any) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_decoder(vocab, tok), query_pre_attn_scalar=HEAD_DIM, sliding_window=64
    )


def _phi3(vocab: int, tok: Any) -> Any:
    from transformers import Phi3Config

    cfg = _decoder(vocab, tok)
    del cfg["head_dim"]  # Phi-3 derives it: hidden / heads
    return Phi3Config(**cfg)


def _granite(vocab: int, tok: Any) -> Any:
    from transformers import GraniteConfig

    # Granite's own scalings, away from 1 so a server that ignored one would show.
    return GraniteConfig(
        **_decoder(vocab, tok),
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=1.0 / HEAD_DIM,
        logits_scaling=0.5,
    )


def _opt(vocab: int, tok: Any) -> Any:
    from transformers import OPTConfig

    return OPTConfig(
        **_common(vocab, tok),
        ffn_dim=INTERMEDIATE,
        word_embed_proj_dim=HIDDEN,
        init_std=INIT_STD,
    )


FAMILIES: dict[str, Callable[[int, Any], Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "granite": _granite,
    "opt": _opt,
}


def build_family(name: str, seed_model: Path, out: Path, *, seed: int = 0) -> Path:
    """Write tiny model ``name`` (random init, seed tokenizer) into ``out``; returns ``out``.

    Idempotent: a finished dir (its ``config.json`` is written last) is reused as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(seed_model)
    cfg = FAMILIES[name](len(tok), tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def n_params(path: Path) -> int:
    """Parameters stored in a model dir's safetensors (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += _numel(st, key)
    return total


def _numel(st: Any, key: str) -> int:
    n = 1
    for d in st.get_slice(key).get_shape():
        n *= int(d)
    return n


def architecture(name: str) -> str:
    """The ``architectures[0]`` a family's saved config names (e.g. ``Phi3ForCausalLM``)."""
    from transformers import AutoModelForCausalLM

    cfg = FAMILIES[name](2048, _Tok())
    return str(AutoModelForCausalLM._model_mapping[type(cfg)].__name__)


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2
