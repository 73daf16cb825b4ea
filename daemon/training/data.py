"""Turning chunks into training tokens: rendering, loss masks, and document-aware packing.

* Raw text is trained as causal LM on all of its tokens (``<s> text </s>``).
* Chat records (``kind = 'chat'``: a JSON list of ``{role, content}``) are rendered with
  the tokenizer's own chat template; only assistant tokens (and the end-of-turn marker
  the template puts after them) carry labels, everything else is ``-100``.
* Examples are bin-packed (first-fit decreasing) into rows of at most ``max_seq_len``.
  Every document in a row gets its own position ids (restarting at 0) and a block-diagonal
  causal mask, so attention never crosses a document boundary. Rows in a micro-batch are
  grouped by length, so the only filler is the slack of near-full rows (reported as
  ``pad_fraction``); nothing is padded to a fixed length.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IGNORE = -100


@dataclass
class Example:
    """One tokenised training document (or a window of a long one)."""

    ids: list[int]
    labels: list[int]
    chunk_id: int = -1
    source: str = "new"  # new | synthetic | replay | eval | general

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Row:
    """One packed sequence: several whole examples, back to back."""

    examples: list[Example] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(len(e) for e in self.examples)


def parse_messages(text: str) -> list[dict[str, str]]:
    """A chat chunk's messages: a JSON list, ``{"messages": [...]}`` or a prompt/completion
    pair. Raises ValueError on anything else so bad records fail loudly in the plan."""
    data = json.loads(text)
    if isinstance(data, dict):
        if "messages" in data:
            data = data["messages"]
        elif "prompt" in data and ("completion" in data or "answer" in data):
            answer = data.get("completion", data.get("answer"))
            data = [
                {"role": "user", "content": str(data["prompt"])},
                {"role": "assistant", "content": str(answer)},
            ]
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in data
    ):
        raise ValueError("chat chunk is not a list of {role, content} messages")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in data]


def _render(tok: Any, messages: list[dict[str, str]], *, gen_prompt: bool = False) -> str:
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
        return str(out)
    # No template: a plain, stable rendering so chat data still trains.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant: " if gen_prompt else "")


def assistant_spans(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model must learn to produce.

    Each assistant turn's span starts where the generation prompt for that turn ends and
    stops where the rendering of the conversation up to that turn ends, so it includes
    the template's end-of-turn marker (the model learns to stop).
    """
    full = _render(tok, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tok, messages[:i], gen_prompt=True)
        upto = _render(tok, messages[: i + 1])
        if not (full.startswith(prefix) and full.startswith(upto[: len(prefix)])):
            # A template that rewrites earlier turns: fall back to the content itself.
            start = full.find(m["content"], spans[-1][1] if spans else 0)
            if start >= 0:
                spans.append((start, start + len(m["content"])))
            continue
        spans.append((len(prefix), len(upto)))
    return full, spans


def encode_chat(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels (assistant tokens only) of one conversation."""
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if any(s <= a < e for s, e in spans) and b > a:
            labels[k] = ids[k]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids.insert(0, tok.bos_token_id)
        labels.insert(0, IGNORE)
    return ids, labels


def encode_text(tok: Any, text: str) -> tuple[list[int], list[int]]:
    """``<s> text </s>`` with every token a label (causal LM on the document)."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if tok.bos_token_id is not None:
        ids.insert(0, tok.bos_token_id)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return ids, list(ids)


def encode_chunk(tok: Any, chunk: dict[str, Any], source: str, max_len: int) -> list[Example]:
    """A store chunk as one or more examples (long ones are cut into ``max_len`` windows)."""
    if chunk.get("kind") == "chat":
        ids, labels = encode_chat(tok, parse_messages(chunk["text"]))
    else:
        ids, labels = encode_text(tok, chunk["text"])
    cid = int(chunk.get("id", -1))
    return [
        Example(ids[i : i + max_len], labels[i : i + max_len], cid, source)
        for i in range(0, len(ids), max_len)
        if any(x != IGNORE for x in labels[i + 1 : i + max_len])
    ]


def pack(examples: Sequence[Example], max_len: int) -> list[Row]:
    """First-fit decreasing bin packing of whole examples into rows of ``<= max_len``."""
    rows: list[Row] = []
    space: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        n = len(ex)
        for i, free in enumerate(space):
            if free >= n:
                rows[i].examples.append(ex)
                space[i] -= n
                break
        else:
            rows.append(Row([ex]))
            space.append(max_len - n)
    return rows


def micro_batches(rows: Sequence[Row], batch_tokens: int) -> list[list[Row]]:
    """Group rows of similar length so ``n_rows × longest <= batch_tokens``."""
    batches: list[list[Row]] = []
    current: list[Row] = []
    for row in sorted(rows, key=lambda r: r.length, reverse=True):
        longest = current[0].length if current else row.length
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The micro-batch order of one epoch: a pure function of (seed, epoch) so a resumed
    stage replays exactly the batches it would have seen."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass
class Collated:
    """Plain lists for one micro-batch; :func:`to_tensors` makes torch tensors of them."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    segments: list[list[int]]  # document index per token; -1 marks filler
    n_tokens: int  # real tokens
    n_filler: int


def collate(rows: Sequence[Row], pad_id: int) -> Collated:
    """Rows -> lists with per-document positions, labels shifted per document.

    Labels are pre-shifted (``labels[t]`` is the target of position ``t``) and the last
    token of each document gets ``-100``, so no loss term ever crosses a boundary.
    """
    width = max(r.length for r in rows)
    out = Collated([], [], [], [], 0, 0)
    for r in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        for k, ex in enumerate(r.examples):
            ids.extend(ex.ids)
            labels.extend([*ex.labels[1:], IGNORE])
            pos.extend(range(len(ex)))
            seg.extend([k] * len(ex))
        filler = width - len(ids)
        out.n_tokens += len(ids)
        out.n_filler += filler
        ids.extend([pad_id] * filler)
        labels.extend([IGNORE] * filler)
        pos.extend(range(filler))
        seg.extend([-1] * filler)
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.position_ids.append(pos)
        out.segments.append(seg)
    return out


def to_tensors(c: Collated, device: Any, dtype: Any) -> dict[str, Any]:
    """Model inputs: ids, positions, shifted labels and the 4-D block-diagonal causal mask.

    The mask is additive (0 = attend, dtype min = blocked) with shape (B, 1, T, T); a
    token attends to earlier-or-same tokens of its own document only. Filler tokens see
    only themselves, which keeps softmax rows finite.
    """
    import torch

    seg = torch.tensor(c.segments, device=device)
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    filler = (seg < 0)[:, :, None] & torch.eye(t, dtype=torch.bool, device=device)[None]
    allowed = (same & (seg >= 0)[:, :, None] & causal[None]) | filler
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return {
        "input_ids": torch.tensor(c.input_ids, device=device),
        "position_ids": torch.tensor(c.position_ids, device=device),
        "attention_mask": mask[:, None],
        "labels": torch.tensor(c.labels, device=device),
    }
