"""The embedded seed base model: a small Llama trained on the stdlib's docstrings/comments.

Evergreen must run on a machine with no model hub, so it can build its own base model:
a byte-level BPE tokenizer and a Llama-architecture causal LM, both trained on the one
corpus every Python install has. The build is deterministic for a given seed and size
(the step count is fixed per size, never derived from wall time), cached by a manifest,
and published atomically so vLLM never sees a half-written directory.

Sizes and the manifest live in :mod:`~daemon.training.seed_spec`, corpus and tokenizer in
:mod:`~daemon.training.seed_data`; this module builds and publishes.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.training import corpus, fsutil, seed_data
from daemon.training.seed_data import SeedData
from daemon.training.seed_spec import (
    GENERAL_HOLDOUT,
    GENERAL_TRAIN,
    MANIFEST,
    SPECS,
    SeedSpec,
    is_built,
    spec_for,
)

__all__ = [
    "GENERAL_HOLDOUT",
    "GENERAL_TRAIN",
    "MANIFEST",
    "SPECS",
    "SeedSpec",
    "build_seed_model",
    "ensure_seed_model",
    "is_built",
    "spec_for",
]

GENERAL_TRAIN_CHARS = 400_000
HOLDOUT_SEPARATOR = "\n\n"  # holdout texts are written one paragraph block each


def ensure_seed_model(cfg: Config, force: bool = False, progress: bool = False) -> Path:
    """Return the seed model dir for ``cfg``, building it first if needed (or ``force``).

    Safe to call from several processes: a file lock serialises builders and the second
    one finds the finished model.
    """
    final = cfg.seed_model_dir
    spec = spec_for(cfg)
    if is_built(final, spec) and not force:
        seed_data.ensure_bos_on_prompts(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if is_built(final, spec) and not force:
            return final
        fsutil.remove_stale_temps(final.parent)
        tmp = fsutil.make_temp_dir(final)
        try:
            build_seed_model(
                tmp,
                spec_for(cfg),
                seed=cfg.seed.seed,
                time_budget_s=cfg.seed.time_budget_s,
                progress=progress,
                size=cfg.seed.size,
            )
            fsutil.publish_dir(tmp, final, replace=True)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _model_config(spec: SeedSpec, vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def _cosine(steps: int, floor: float = 0.1) -> Any:
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return lr_at


def _pretrain(
    model: Any, data: SeedData, spec: SeedSpec, *, deadline: float, bar: _Bar
) -> tuple[int, list[float]]:
    """Plain next-token pretraining for ``spec.steps`` steps (or until ``deadline``)."""
    import torch

    from daemon.training.device import pick

    dev = pick()
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(spec.steps))
    model.train()
    losses: list[float] = []
    blocks = data.blocks
    for step in range(spec.steps):
        start = (step * spec.batch_size) % len(blocks)
        batch = [blocks[(start + i) % len(blocks)] for i in range(spec.batch_size)]
        x = torch.tensor(batch, device=dev.device)
        with torch.autocast(dev.device.type, dtype=dev.dtype, enabled=dev.dtype != torch.float32):
            loss = _lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.advance(loss=losses[-1])
        if time.time() > deadline and step + 1 < spec.steps:
            return step + 1, losses
    model.eval()
    return spec.steps, losses


def build_seed_model(
    out: Path,
    spec: SeedSpec,
    *,
    seed: int,
    time_budget_s: float,
    progress: bool = False,
    size: str = "custom",
) -> dict[str, Any]:
    """Build tokenizer + model into ``out`` (an empty dir); returns the manifest.

    The step count is fixed by ``spec`` so a build is reproducible; the time budget only
    cuts a build short on a machine far slower than planned, and the manifest says so.
    """
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from daemon.training.device import pick

    hf_logging.disable_progress_bar()
    t0 = time.time()
    data = seed_data.prepare(spec, seed)
    dev = pick()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_model_config(spec, data.vocab)).to(dev.device)  # type: ignore[arg-type]
    n_params = sum(p.numel() for p in model.parameters())
    label = f"seed model ({size}, {n_params / 1e6:.1f}M params)"
    with _Bar(progress, spec.steps, label) as bar:
        steps_done, losses = _pretrain(model, data, spec, deadline=t0 + time_budget_s, bar=bar)
    model.eval()
    hold_loss = _holdout_loss(model, data, spec.seq_len, dev.device)
    _save_model(out, model, data.hf_tokenizer)
    _write_general_texts(out, data)
    tail = losses[-10:]
    manifest = {
        "kind": "evergreen-seed",
        "size": size,
        "seed": seed,
        "spec": asdict(spec),
        "vocab_size": data.vocab,
        "n_params": n_params,
        **_corpus_facts(data),
        "steps": spec.steps,
        "steps_done": steps_done,
        "stopped_early": steps_done < spec.steps,
        "train_loss": sum(tail) / len(tail),
        "holdout_loss": hold_loss,
        "device": dev.name,
        "elapsed_s": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return manifest


def _save_model(out: Path, model: Any, hf_tok: Any) -> None:
    """Weights (safetensors), tokenizer and a greedy generation config, HF layout."""
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    GenerationConfig(
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)


def _write_general_texts(out: Path, data: SeedData) -> None:
    """The general anchor texts stages use: a slice of the training corpus (mixed into
    training) and the held-out texts (general loss in evaluation)."""
    held = set(data.hold_texts)
    train_slice: list[str] = []
    size_chars = 0
    for t in data.texts:
        if t in held:
            continue
        train_slice.append(t)
        size_chars += len(t)
        if size_chars >= GENERAL_TRAIN_CHARS:
            break
    (out / GENERAL_TRAIN).write_text(HOLDOUT_SEPARATOR.join(train_slice) + "\n", encoding="utf-8")
    (out / GENERAL_HOLDOUT).write_text(
        HOLDOUT_SEPARATOR.join(data.hold_texts) + "\n", encoding="utf-8"
    )


def _corpus_facts(data: SeedData) -> dict[str, Any]:
    return {
        "corpus_sha256": corpus.corpus_hash(data.texts),
        "corpus_texts": len(data.texts),
        "corpus_chars": sum(len(t) for t in data.texts),
        "holdout_texts": len(data.hold_texts),
    }


def _holdout_loss(model: Any, data: SeedData, seq_len: int, device: Any) -> float:
    import torch

    hf = data.hf_tokenizer
    enc = [
        e.ids for e in data.tokenizer.encode_batch(data.hold_texts[:200], add_special_tokens=False)
    ]
    blocks = seed_data.to_blocks(enc, seq_len, hf.bos_token_id, hf.eos_token_id)[:16]
    if not blocks:
        return float("nan")
    with torch.no_grad():
        return float(_lm_loss(model, torch.tensor(blocks, device=device)))


def _lm_loss(model: Any, x: Any) -> Any:
    """Next-token cross-entropy of ``x[:, 1:]`` given ``x[:, :-1]``."""
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


class _Bar:
    """A rich progress bar, or nothing when ``enabled`` is False (daemon, tests)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, loss="-")
        return self

    def advance(self, **fields: Any) -> None:
        if self._progress is not None:
            shown = {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in fields.items()}
            self._progress.update(self._task, advance=1, **shown)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
