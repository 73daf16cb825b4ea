"""Adapter directories as the swapper sees them: paths, validation, the zero adapter.

Every path handed to vLLM is built here from the state dir and a version name, resolved and
checked to stay inside the state dir, so a crafted version name or a symlink cannot make
vLLM read files from elsewhere. Only safetensors weights are accepted: a pickle file in an
adapter dir is refused outright, because loading a pickle runs code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.errors import EvergreenError

BASE_VERSION = "base"
ZERO_DIR = "zero-adapter"
RESOLVER_DIR = "resolve"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class AdapterRejected(EvergreenError, ValueError):
    """An adapter dir that must not be served; the message says why."""


def served_name(cfg: Config, version: str) -> str:
    """The pinned model name of ``version``, e.g. ``evergreen-v0007`` or ``evergreen-base``."""
    return f"{cfg.serving.model_name}-{version}"


def _inside(path: Path, root: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise AdapterRejected(f"{path} resolves outside the state dir ({resolved})")
    return resolved


def adapter_path(cfg: Config, version: str) -> Path:
    """``<state>/adapters/<version>`` (or the zero adapter for ``base``), resolved and checked."""
    if not _VERSION_RE.match(version):
        raise AdapterRejected(f"invalid adapter version name {version!r}")
    if version == BASE_VERSION:
        return _inside(cfg.serving_dir / ZERO_DIR, cfg.state_path)
    return _inside(cfg.adapters_dir / version, cfg.state_path)


def validate_adapter_dir(cfg: Config, path: Path) -> dict[str, Any]:
    """Check an adapter dir before vLLM sees it; returns its adapter_config.

    Refuses: files resolving outside the state dir, pickle weights, a missing or unreadable
    safetensors file (a truncated file fails its header check), a non-LoRA config and a rank
    above ``serving.max_lora_rank``.
    """
    root = cfg.state_path
    path = _inside(path, root)
    if not path.is_dir():
        raise AdapterRejected(f"adapter dir {path} does not exist")
    for item in path.rglob("*"):
        _inside(item, root)
        if item.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterRejected(
                f"{item.name}: pickle weights are refused (safetensors only) in {path}"
            )
    try:
        conf = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"{path / CONFIG_FILE}: unreadable adapter config ({exc})") from None
    if not isinstance(conf, dict) or conf.get("peft_type") != "LORA":
        raise AdapterRejected(f"{path}: not a LoRA adapter (peft_type must be LORA)")
    rank = conf.get("r")
    if not isinstance(rank, int) or not 0 < rank <= cfg.serving.max_lora_rank:
        raise AdapterRejected(
            f"{path}: LoRA rank {rank!r} exceeds serving.max_lora_rank={cfg.serving.max_lora_rank}"
        )
    _check_safetensors(path / WEIGHTS_FILE)
    return conf


def _check_safetensors(weights: Path) -> None:
    """Parse the header and check every tensor's bytes are present (catches truncation)."""
    if not weights.is_file():
        raise AdapterRejected(f"{weights}: missing (adapters must ship {WEIGHTS_FILE})")
    size = weights.stat().st_size
    try:
        with open(weights, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size or n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise AdapterRejected(f"{weights}: not a valid safetensors file ({exc})") from None
    if 8 + n + end > size:
        raise AdapterRejected(f"{weights}: truncated ({size} bytes, needs {8 + n + end})")


def ensure_zero_adapter(cfg: Config) -> Path:
    """A LoRA with B = 0 on the base model: the stable name's target before any promotion.

    vLLM can only alias a loaded adapter, so "the base model" is served through an adapter
    whose delta is exactly zero. Built once from the base model's config (no weights are
    loaded), atomically: a temp dir is renamed into place only when complete.
    """
    final = cfg.serving_dir / ZERO_DIR
    if (final / WEIGHTS_FILE).exists():
        return final.resolve()
    cfg.serving_dir.mkdir(parents=True, exist_ok=True)
    # Built in a subprocess: torch + transformers would add ~350 MB to the daemon for good.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.serving.adapters",
            str(cfg.resolved_base_model()),
            str(final),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (final / WEIGHTS_FILE).exists():
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise AdapterRejected(
            f"cannot build the zero adapter: {lines[-1] if lines else proc.returncode}"
        )
    return final.resolve()


def _zero_targets(model: Any) -> tuple[str, ...]:
    """Where the zero LoRA sits: q_proj/v_proj, or the fused qkv_proj (Phi-3) or, failing
    both, the first linear layer named in the decoder blocks (any one will do: B = 0)."""
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    for pick in (("q_proj", "v_proj"), ("qkv_proj",)):
        if set(pick) <= leaves:
            return pick
    in_blocks = [n.rsplit(".", 1)[-1] for n in names if any(p.isdigit() for p in n.split("."))]
    return tuple(in_blocks[:1])


def _build_zero_adapter(base: Path, final: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    rank = 8
    tensors: dict[str, torch.Tensor] = {}
    targets = _zero_targets(model)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, module.in_features)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(module.out_features, rank)
    if not tensors:
        raise AdapterRejected(f"base model {base} has no attention projections for a zero LoRA")
    conf = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(targets),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    tmp = Path(tempfile.mkdtemp(prefix=".zero-", dir=final.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(conf, indent=2), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; theirs is just as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_for_resolver(cfg: Config, version: str, path: Path) -> None:
    """``<serving>/resolve/<name>-<version>`` -> the version dir, for vLLM's filesystem resolver.

    A pinned name that is not loaded (old versions, or any version right after a vLLM
    restart) is then loaded on its first request. Only immutable versioned names get a link;
    the stable name never does, so the resolver can never serve a stale "current".
    """
    link_dir = cfg.serving_dir / RESOLVER_DIR
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / served_name(cfg, version)
    if link.is_symlink() and link.resolve() == path:
        return
    tmp = link_dir / f".{link.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(path, tmp)
    os.replace(tmp, link)


if __name__ == "__main__":  # python -m daemon.serving.adapters BASE_MODEL_DIR ZERO_DIR
    _build_zero_adapter(Path(sys.argv[1]), Path(sys.argv[2]))
