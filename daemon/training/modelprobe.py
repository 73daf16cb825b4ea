"""The heavy half of ``evergreen check-model``, run as a subprocess (it imports torch).

``python -m daemon.training.modelprobe [--targets auto|a,b] PATH...`` loads each model
directory's config and tokenizer with transformers, asks vLLM's model registry whether it
implements the architecture and LoRA on it, builds the model on the ``meta`` device (no
weights read) to list the modules ``auto`` picks, and prints one JSON object:
``{PATH: [finding, ...]}``. Each finding is ``{check, status, detail, fix}`` with status
``ok``, ``note`` or ``problem`` (see :mod:`daemon.training.modelcheck`, which runs this).
Checking several paths in one run pays the imports (vLLM's registry: ~10 s of CPU) once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from typing import Any

Finding = dict[str, str]


def finding(check: str, status: str, detail: str, fix: str = "") -> Finding:
    return {"check": check, "status": status, "detail": detail, "fix": fix}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def check_config(path: str) -> tuple[Any, list[Finding]]:
    """transformers reads ``config.json`` (the file checks already parsed it as JSON)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path), []
    except Exception as exc:  # unknown model_type, bad field: say so, check what we can
        return None, [
            finding(
                "config",
                "problem",
                f"transformers cannot read config.json ({_first_line(exc)})",
                "use a model type this transformers version knows, or upgrade transformers",
            )
        ]


def check_tokenizer(path: str, config: Any) -> list[Finding]:
    """The tokenizer loads, covers the model's vocabulary, and has a chat template or not."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        return [
            finding(
                "tokenizer",
                "problem",
                f"no tokenizer loads from {path} ({_first_line(exc)})",
                "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) from"
                " where the model came from into this directory",
            )
        ]
    out = []
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if vocab is not None and len(tok) > int(vocab):
        out.append(
            finding(
                "tokenizer",
                "problem",
                f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {vocab}",
                "use the tokenizer the model was trained with",
            )
        )
    else:
        out.append(finding("tokenizer", "ok", f"{type(tok).__name__}, {len(tok)} tokens"))
    if getattr(tok, "chat_template", None):
        out.append(finding("chat template", "note", "present: vLLM's chat endpoint can use it"))
    else:
        out.append(
            finding(
                "chat template",
                "note",
                "absent: completions work; chat requests need vLLM's --chat-template",
            )
        )
    return out


def _vllm_class(registry: Any, version: str, architectures: list[str]) -> Any:
    """``(arch, class)`` of the first architecture vLLM implements, or a problem finding."""
    supported = set(registry.get_supported_archs())
    arch = next((a for a in architectures if a in supported), None)
    if arch is None:
        return finding(
            "vllm",
            "problem",
            f"vLLM {version} has no model class for {', '.join(architectures)}",
            "vLLM cannot serve it: pick a base model of an architecture vLLM implements"
            " (Llama, Qwen2/3, Gemma, Mistral, Phi-3, ...), or a vLLM version that has it",
        )
    try:
        return arch, registry.models[arch].load_model_cls()
    except Exception as exc:  # its module needs a package this install lacks
        return finding(
            "vllm",
            "problem",
            f"vLLM {version} cannot load its class for {arch} ({_first_line(exc)})",
            "install what the error names, or pick another base model",
        )


def check_vllm(architectures: list[str]) -> list[Finding]:
    """vLLM implements one of the config's architectures, and LoRA on it."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from vllm import __version__ as vllm_version
            from vllm.model_executor.models import ModelRegistry
            from vllm.model_executor.models.interfaces import supports_lora
            from vllm.model_executor.models.interfaces_base import is_text_generation_model
    except Exception as exc:
        return [
            finding(
                "vllm",
                "problem",
                f"vLLM is not importable here ({_first_line(exc)})",
                "install it: pip install -e '.[cpu]' on a CPU machine, '.[gpu]' on a GPU one",
            )
        ]
    found = _vllm_class(ModelRegistry, vllm_version, architectures)
    if isinstance(found, dict):
        return [found]
    arch, cls = found
    if not is_text_generation_model(cls):
        return [
            finding(
                "vllm",
                "problem",
                f"vLLM {vllm_version} runs {arch} as a pooling model, not a text generator",
                "pick a causal language model (an ...ForCausalLM architecture)",
            )
        ]
    out = [finding("vllm", "ok", f"vLLM {vllm_version} implements {arch}")]
    if supports_lora(cls):
        out.append(finding("lora", "ok", f"vLLM serves LoRA adapters on {arch}"))
    else:
        out.append(
            finding(
                "lora",
                "problem",
                f"vLLM {vllm_version} cannot serve LoRA adapters on {arch}",
                "Evergreen serves what it trains as LoRA adapters: pick a base model of a"
                " family vLLM serves LoRA on (Llama, Qwen2/3, Gemma, Mistral, Phi-3, ...)",
            )
        )
    return out


def check_targets(config: Any, targets: str | list[str]) -> list[Finding]:
    """The modules LoRA goes on: ``auto``'s pick, or the configured list, on a meta model."""
    import torch
    from transformers import AutoModelForCausalLM

    from daemon.training.targets import resolve_targets

    label = "auto" if targets == "auto" else "configured"
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        picked = resolve_targets(model, targets)
    except Exception as exc:
        return [
            finding(
                "targets",
                "problem",
                f"no LoRA targets ({label}): {_first_line(exc)}",
                "set training.target_modules to module names this model has"
                if label == "configured"
                else "set training.target_modules to the model's linear layers by name",
            )
        ]
    return [finding("targets", "ok", f"{label} picks {', '.join(picked)}")]


def probe(path: str, targets: str | list[str], *, vllm: bool = True) -> list[Finding]:
    """Every heavy check of one model directory (its config.json parses as JSON)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        architectures = list(json.load(f).get("architectures") or [])
    config, out = check_config(path)
    out += check_tokenizer(path, config)
    if vllm:
        out += check_vllm(architectures)
    else:
        out.append(finding("vllm", "note", "not checked: vLLM does not run beside this daemon"))
    if config is not None:
        out += check_targets(config, targets)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", default="auto", help="'auto' or a comma-separated list")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM checks")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local dir only: never ask a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    targets: str | list[str] = (
        "auto" if args.targets == "auto" else [t for t in args.targets.split(",") if t]
    )
    result = {p: probe(p, targets, vllm=not args.no_vllm) for p in args.paths}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
