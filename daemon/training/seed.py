"""The embedded seed base model: a small Llama trained on the stdlib's docstrings/comments.

Evergreen must run on a machine with no model hub, so it can build its own base model:
a byte-level BPE tokenizer and a Llama-architecture causal LM, both trained on the one
corpus every Python install has. The build is deterministic for a given seed and size
(the step count is fixed per size, never derived from wall time), cached by a manifest,
and published atomically so vLLM never sees a half-written directory.
"""

from __future__ import annotations

import fcntl
import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.training import corpus, fsutil

MANIFEST = "seed_manifest.json"
GENERAL_HOLDOUT = "general_holdout.txt"
GENERAL_TRAIN = "general_train.txt"  # a slice of the training corpus, for general mixing
GENERAL_TRAIN_CHARS = 400_000
HOLDOUT_SEPARATOR = "\n\n"  # holdout texts are written one paragraph block each
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Each turn is "<|role|>\n{content}</s>\n"; the assistant's content and its </s> are what
# chat training puts loss on, so the model learns to answer and then stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class SeedSpec:
    """Architecture and pretraining recipe of one seed size."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    max_corpus_chars: int  # 0 = the whole stdlib corpus
    holdout_fraction: float = 0.02
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# head_dim is 64 or 32 (vLLM CPU attention supports both); vocab sizes are multiples of 64.
SPECS: dict[str, SeedSpec] = {
    "default": SeedSpec(
        vocab_size=8192,
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        intermediate_size=1024,
        seq_len=256,
        batch_size=8,
        steps=120,
        learning_rate=2e-3,
        max_corpus_chars=0,
    ),
    "small": SeedSpec(
        vocab_size=4096,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=704,
        seq_len=128,
        batch_size=16,
        steps=600,
        learning_rate=2e-3,
        max_corpus_chars=0,
    ),
    "tiny": SeedSpec(
        vocab_size=2048,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=352,
        seq_len=128,
        batch_size=8,
        steps=30,
        learning_rate=3e-3,
        max_corpus_chars=250_000,
    ),
}


def spec_for(cfg: Config) -> SeedSpec:
    spec = SPECS[cfg.seed.size]
    steps = int(getattr(cfg.seed, "steps", 0) or 0)
    if steps:
        spec = SeedSpec(**{**asdict(spec), "steps": steps})
    return spec


def is_built(path: Path, spec: SeedSpec | None = None) -> bool:
    """A finished build (and, given ``spec``, one made with the same step count)."""
    if not ((path / MANIFEST).is_file() and (path / "config.json").is_file()):
        return False
    if spec is None:
        return True
    try:
        return int(json.loads((path / MANIFEST).read_text())["steps"]) == spec.steps
    except (ValueError, KeyError, OSError):
        return False


def ensure_seed_model(cfg: Config, force: bool = False, progress: bool = False) -> Path:
    """Return the seed model dir for ``cfg``, building it first if needed (or ``force``).

    Safe to call from several processes: a file lock serialises builders and the second
    one finds the finished model.
    """
    final = cfg.seed_model_dir
    spec = spec_for(cfg)
    if is_built(final, spec) and not force:
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


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style) whose specials come first: <s>=0, </s>=1, <pad>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def wrap_tokenizer(tok: Any, max_len: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


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


def _blocks(ids: list[list[int]], seq_len: int, bos: int, eos: int) -> list[list[int]]:
    """Concatenate ``<s> text </s>`` streams and cut into ``seq_len + 1`` windows."""
    stream: list[int] = []
    for x in ids:
        stream.append(bos)
        stream.extend(x)
        stream.append(eos)
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]


@dataclass
class _SeedData:
    texts: list[str]
    hold_texts: list[str]
    tokenizer: Any  # tokenizers.Tokenizer
    hf_tokenizer: Any  # transformers fast tokenizer
    vocab: int
    blocks: list[list[int]]


def _prepare_data(spec: SeedSpec, seed: int) -> _SeedData:
    """Corpus -> held-out slice, tokenizer, and shuffled training blocks."""
    texts = list(corpus.iter_texts(max_chars=spec.max_corpus_chars))
    if len(texts) < 50:
        raise RuntimeError(
            f"stdlib corpus too small ({len(texts)} texts) under {corpus.stdlib_root()}"
        )
    train_texts, hold_texts = corpus.split_holdout(texts, spec.holdout_fraction)
    tok = train_tokenizer(train_texts, spec.vocab_size)
    hf_tok = wrap_tokenizer(tok, spec.max_position_embeddings)
    enc = [e.ids for e in tok.encode_batch(train_texts, add_special_tokens=False)]
    blocks = _blocks(enc, spec.seq_len, hf_tok.bos_token_id, hf_tok.eos_token_id)
    if not blocks:
        raise RuntimeError("seed corpus produced no training blocks")
    random.Random(seed).shuffle(blocks)
    vocab = int(math.ceil(tok.get_vocab_size() / 64) * 64)
    return _SeedData(texts, hold_texts, tok, hf_tok, vocab, blocks)


def _cosine(steps: int, floor: float = 0.1) -> Any:
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return lr_at


def _pretrain(
    model: Any, data: _SeedData, spec: SeedSpec, *, deadline: float, bar: _Bar
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
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from daemon.training.device import pick

    hf_logging.disable_progress_bar()
    t0 = time.time()
    data = _prepare_data(spec, seed)
    dev = pick()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_model_config(spec, data.vocab)).to(dev.device)  # type: ignore[arg-type]
    n_params = sum(p.numel() for p in model.parameters())
    label = f"seed model ({size}, {n_params / 1e6:.1f}M params)"
    with _Bar(progress, spec.steps, label) as bar:
        steps_done, losses = _pretrain(model, data, spec, deadline=t0 + time_budget_s, bar=bar)
    model.eval()
    hf_tok = data.hf_tokenizer
    held = set(data.hold_texts)
    hold_loss = _holdout_loss(model, data, spec.seq_len, dev.device)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    GenerationConfig(
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)
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
    tail = losses[-10:]
    manifest = {
        "kind": "evergreen-seed",
        "size": size,
        "seed": seed,
        "spec": asdict(spec),
        "vocab_size": data.vocab,
        "n_params": n_params,
        "corpus_sha256": corpus.corpus_hash(data.texts),
        "corpus_texts": len(data.texts),
        "corpus_chars": sum(len(t) for t in data.texts),
        "holdout_texts": len(data.hold_texts),
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


def _holdout_loss(model: Any, data: _SeedData, seq_len: int, device: Any) -> float:
    import torch

    hf = data.hf_tokenizer
    enc = [
        e.ids for e in data.tokenizer.encode_batch(data.hold_texts[:200], add_special_tokens=False)
    ]
    blocks = _blocks(enc, seq_len, hf.bos_token_id, hf.eos_token_id)[:16]
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
