"""Evaluation of a candidate adapter against its parent (the baseline), in one process.

Both are measured on the same sets with the same code, so the promotion gate compares
like with like:

* ``new_loss``: holdout chunks of the stage's new documents (train chunks if none);
* ``retention_loss``: holdout chunks of already-trained documents plus the replay chunks;
* ``general_loss``: the general anchor text (seed corpus holdout or a user file);
* ``eval:<name>``: user JSONL sets ``{"prompt", "answer"}``, greedy completion scored by
  exact match or containment, as points 0-100.

Losses are token-weighted means over packed, document-masked batches (the training
packer), so there is one definition of "loss" everywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from daemon.training import data as data_mod
from daemon.training.data import Example

GENERAL_MAX_TOKENS = 8192
EVAL_MAX_ITEMS = 200


def example_losses(
    model: Any, examples: Sequence[Example], *, max_len: int, batch_tokens: int, device: Any
) -> tuple[float, dict[int, float], int]:
    """Token-weighted mean loss over ``examples``, per-chunk mean losses, and token count."""
    import torch
    import torch.nn.functional as F

    if not examples:
        return math.nan, {}, 0
    sums: dict[int, list[float]] = {}
    total, count = 0.0, 0
    rows = data_mod.pack(examples, max_len)
    was_training = model.training
    model.eval()
    dtype = next(p for p in model.parameters()).dtype
    with torch.no_grad():
        for batch in data_mod.micro_batches(rows, batch_tokens):
            col = data_mod.collate(batch, pad_id=0)
            t = data_mod.to_tensors(col, device, dtype)
            labels = t.pop("labels")
            logits = model(**t).logits.float()
            tok_loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=data_mod.IGNORE,
                reduction="none",
            ).reshape(labels.shape)
            valid = labels != data_mod.IGNORE
            for b, row in enumerate(batch):
                start = 0
                for ex in row.examples:
                    sl = slice(start, start + len(ex))
                    n = int(valid[b, sl].sum())
                    s = float(tok_loss[b, sl][valid[b, sl]].sum())
                    acc = sums.setdefault(ex.chunk_id, [0.0, 0.0])
                    acc[0] += s
                    acc[1] += n
                    total += s
                    count += n
                    start += len(ex)
    model.train(was_training)
    per_chunk = {cid: s / n for cid, (s, n) in sums.items() if n and cid >= 0}
    return (total / count if count else math.nan), per_chunk, count


def general_examples(tok: Any, path: Path, max_len: int) -> list[Example]:
    """The anchor text cut into ``max_len`` windows, capped at GENERAL_MAX_TOKENS tokens."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    ids = list(tok(text, add_special_tokens=False)["input_ids"])[:GENERAL_MAX_TOKENS]
    return [
        Example(ids[i : i + max_len], ids[i : i + max_len], -1, "eval")
        for i in range(0, len(ids), max_len)
        if len(ids[i : i + max_len]) > 1
    ]


def load_eval_set(path: Path) -> list[dict[str, Any]]:
    """``{"prompt", "answer"}`` records; malformed lines are skipped (counted by caller)."""
    items: list[dict[str, Any]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "prompt" in rec and "answer" in rec:
            items.append(rec)
    return items[:EVAL_MAX_ITEMS]


def _normalise(s: str) -> str:
    return " ".join(s.lower().split())


def match(completion: str, answer: str, mode: str) -> bool:
    c, a = _normalise(completion), _normalise(answer)
    return c == a if mode == "exact" else bool(a) and a in c


def greedy_completions(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    device: Any,
    chat: bool = False,
) -> list[str]:
    """Greedy continuation of each prompt (raw text, or chat-rendered if ``chat``)."""
    import torch

    outs: list[str] = []
    was_training = model.training
    model.eval()
    eos = tok.eos_token_id
    with torch.no_grad():
        for p in prompts:
            if chat and getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                ids = list(tok(text, add_special_tokens=False)["input_ids"])
            else:
                ids = list(tok(p, add_special_tokens=False)["input_ids"])
                if tok.bos_token_id is not None:
                    ids.insert(0, tok.bos_token_id)
            x = torch.tensor([ids], device=device)
            gen = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            )
            outs.append(tok.decode(gen[0, len(ids) :], skip_special_tokens=True))
    model.train(was_training)
    return outs


def eval_set_points(
    model: Any, tok: Any, items: Sequence[dict[str, Any]], mode: str, device: Any
) -> float:
    """Share of items answered right, in points 0-100."""
    if not items:
        return math.nan
    chat = [bool(it.get("chat", False)) for it in items]
    right = 0
    for flag in (False, True):
        group = [it for it, c in zip(items, chat, strict=True) if c == flag]
        if not group:
            continue
        longest = max(
            len(tok(str(it["answer"]), add_special_tokens=False)["input_ids"]) for it in group
        )
        comps = greedy_completions(
            model,
            tok,
            [str(it["prompt"]) for it in group],
            max_new_tokens=min(64, longest + 4),
            device=device,
            chat=flag,
        )
        right += sum(match(c, str(it["answer"]), mode) for c, it in zip(comps, group, strict=True))
    return 100.0 * right / len(items)


@contextmanager
def baseline_view(model: Any, parent_path: str | None) -> Iterator[None]:
    """Temporarily make ``model`` (a PeftModel holding the candidate as 'default') behave
    like the baseline: the parent adapter loaded beside it, or no adapter at all."""
    if parent_path:
        model.load_adapter(parent_path, adapter_name="baseline")
        model.set_adapter("baseline")
        try:
            yield
        finally:
            model.set_adapter("default")
            model.delete_adapter("baseline")
            # set_adapter marks only the active adapter trainable; the candidate is done
            # training, so nothing needs restoring.
    else:
        with model.disable_adapter():
            yield


def measure(
    model: Any,
    tok: Any,
    sets: dict[str, list[Example]],
    evals: dict[str, list[dict[str, Any]]],
    *,
    max_len: int,
    batch_tokens: int,
    device: Any,
    match_mode: str,
) -> dict[str, float]:
    """All metrics of the model's current view (candidate or baseline)."""
    out: dict[str, float] = {}
    for key, exs in sets.items():
        if exs:
            loss, _, _ = example_losses(
                model, exs, max_len=max_len, batch_tokens=batch_tokens, device=device
            )
            out[key] = loss
    for name, items in evals.items():
        out[f"eval:{name}"] = eval_set_points(model, tok, items, match_mode, device)
    return out


def evaluate_both(
    model: Any,
    tok: Any,
    *,
    parent_path: str | None,
    sets: dict[str, list[Example]],
    evals: dict[str, list[dict[str, Any]]],
    max_len: int,
    batch_tokens: int,
    device: Any,
    match_mode: str,
) -> dict[str, dict[str, float]]:
    """``{"candidate": {...}, "baseline": {...}}`` on identical sets."""
    kw = {
        "max_len": max_len,
        "batch_tokens": batch_tokens,
        "device": device,
        "match_mode": match_mode,
    }
    cand = measure(model, tok, sets, evals, **kw)
    with baseline_view(model, parent_path) if hasattr(model, "disable_adapter") else nullcontext():
        base = measure(model, tok, sets, evals, **kw)
    for m in (cand, base):
        for key in [k for k in m if k.endswith("_loss")]:
            m[key.replace("_loss", "_ppl")] = math.exp(min(m[key], 50.0))
    return {"candidate": cand, "baseline": base}
