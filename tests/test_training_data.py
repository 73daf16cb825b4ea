"""Rendering, loss masks and document-aware packing (real tokenizer, real tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.training import data
from daemon.training.data import IGNORE, Example


@pytest.fixture(scope="module")
def tok(tiny_seed_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_seed_model)


def test_chat_labels_cover_only_assistant_tokens(tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    ids, labels = data.encode_chat(tok, msgs)
    assert len(ids) == len(labels)
    learned = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert "Blue." in learned and "Green." in learned
    assert "Name a colour" not in learned and "Another" not in learned
    assert "Be brief" not in learned and "<|user|>" not in learned
    # the end-of-turn marker after each answer is learned (the model learns to stop)
    assert learned.count(tok.eos_token) == 2
    # labelled tokens are exactly the ids at those places
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True))
    # the prompt part is fully masked
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(lab == IGNORE for lab in labels[:n_prompt])


def test_chat_chunk_formats_and_errors(tok) -> None:
    pair = {"id": 3, "kind": "chat", "text": json.dumps({"prompt": "Hi", "completion": "Yo"})}
    (ex,) = data.encode_chunk(tok, pair, "new", 512)
    assert ex.chunk_id == 3 and "Yo" in tok.decode(
        [i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE]
    )
    with pytest.raises(ValueError, match="role, content"):
        data.encode_chunk(tok, {"id": 1, "kind": "chat", "text": json.dumps([1, 2])}, "new", 64)


def test_text_chunk_is_bos_text_eos_all_labelled(tok) -> None:
    (ex,) = data.encode_chunk(tok, {"id": 1, "kind": "text", "text": "hello world"}, "new", 64)
    assert ex.ids[0] == tok.bos_token_id and ex.ids[-1] == tok.eos_token_id
    assert ex.labels == ex.ids
    long = data.encode_chunk(tok, {"id": 2, "text": "word " * 300}, "new", 64)
    assert len(long) > 1 and all(len(e) <= 64 for e in long)


def test_pack_first_fit_no_padding_to_fixed_length() -> None:
    exs = [Example([1] * n, [1] * n, i) for i, n in enumerate([50, 30, 20, 60, 40, 10, 90])]
    rows = data.pack(exs, 100)
    assert sorted(e.chunk_id for r in rows for e in r.examples) == list(range(7))
    assert all(r.length <= 100 for r in rows)
    assert len(rows) == 3  # 300 tokens in rows of 100: optimal
    batches = data.micro_batches(rows, 200)
    col = data.collate(batches[0], pad_id=0)
    assert len(col.input_ids[0]) == max(r.length for r in batches[0])
    # positions restart per document, labels are shifted and never cross documents
    r0 = batches[0][0]
    assert col.position_ids[0][: len(r0.examples[0])] == list(range(len(r0.examples[0])))
    assert col.position_ids[0][len(r0.examples[0])] == 0
    assert col.labels[0][len(r0.examples[0]) - 1] == IGNORE


def test_mask_is_block_diagonal_causal() -> None:
    import torch

    rows = [data.Row([Example([5, 6, 7], [5, 6, 7], 0), Example([8, 9], [8, 9], 1)])]
    t = data.to_tensors(data.collate(rows, 0), "cpu", torch.float32)
    allowed = (t["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert t["position_ids"][0].tolist() == [0, 1, 2, 0, 1]


@pytest.mark.slow
def test_packed_documents_do_not_attend_across_boundaries(tiny_seed_model: Path, tok) -> None:
    """Changing document A changes nothing in document B's logits in the same pack, and B
    packed after A gives the same logits as B alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_seed_model).eval()
    b_ids = data.encode_text(tok, "Document B is about rivers and seas.")[0]

    def logits_of(a_text: str) -> torch.Tensor:
        a = data.encode_text(tok, a_text)[0]
        row = data.Row([Example(a, a, 0), Example(b_ids, b_ids, 1)])
        t = data.to_tensors(data.collate([row], 0), "cpu", torch.float32)
        t.pop("labels")
        with torch.no_grad():
            out = model(**t).logits[0]
        return out[len(a) :], out[: len(a)]

    b1, a1 = logits_of("Alpha alpha alpha document A.")
    b2, a2 = logits_of("Something else entirely, longer than before, with other words!")
    assert torch.allclose(b1, b2, atol=1e-5)
    assert not torch.allclose(a1[:3], a2[:3], atol=1e-3)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b_ids])).logits[0]
    assert torch.allclose(b1, alone, atol=1e-4)
