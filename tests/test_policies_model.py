"""``most_forgotten`` on a tiny real model: it replays the chunks whose loss rose most.

The tiny seed model learns six old chunks (stage 1, the "learned" loss of each is
recorded as at promotion), then trains on new data about vault codes (stage 2). Losses
are measured on the real model with the scorer's own code (``encode_chunk`` +
``example_losses``, as ``daemon.training.score`` runs them) and written to
``chunk_scores`` under the current adapter version; then the engine plans a stage with
``most_forgotten`` replay. The new data overwrites the unrelated old texts far
more than the vault-code records, so those are what must be replayed first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon import config as config_mod
from daemon.scheduling import planning
from store import adapters, documents
from store.db import open_db, transaction

OLD = [
    "Record 1: the vault code of station Amber is 4417.",
    "Record 2: the vault code of station Birch is 9023.",
    "Record 3: the vault code of station Cedar is 1185.",
    "Zebra quartz mango violin seventeen harbor plinth orbit.",
    "The ferry to Ostrava leaves at dawn when the tide is low.",
    "def frobnicate(x): return x * 31 + 7  # magic hashing step",
]
REPEATS = [1, 3, 1, 3, 1, 3]  # uneven exposure: learned losses differ per chunk
NEW = [
    "Record 1: the vault code of station Amber is 6630.",
    "Record 4: the vault code of station Dune is 0274.",
]


def _train(model: Any, tok: Any, texts: list[str], epochs: int) -> None:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()


def _score(model: Any, tok: Any, db: Any, ids: list[int]) -> dict[int, float]:
    """Per-chunk mean token loss, measured the way the scorer subprocess measures it
    (``daemon.training.score``: encode_chunk + example_losses over the store's chunks)."""
    from daemon.training.data import encode_chunk
    from daemon.training.evaluate import example_losses

    examples = [
        ex
        for chunk in documents.chunks_by_ids(db, ids)
        for ex in encode_chunk(tok, chunk, "eval", 512)
    ]
    _, per_chunk, _ = example_losses(model, examples, max_len=512, batch_tokens=4096, device="cpu")
    return per_chunk


@pytest.mark.slow
def test_most_forgotten_picks_largest_loss_rise(tiny_seed_model: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_seed_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_seed_model)
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "seed": {"size": "tiny"},
            "policy": {"replay": {"name": "most_forgotten", "ratio": 1.0}},
        }
    )
    db = open_db(cfg.db_path)
    try:
        with transaction(db):
            old_doc = documents.insert_document(
                db, track="default", path="/inbox/old.txt", content_hash="old", size=1,
                mtime=0.0, fmt="text",
                chunks=[documents.ChunkIn(t, 10, "train") for t in OLD],
            )  # fmt: skip
        ids = [
            r[0]
            for r in db.conn.execute(
                "SELECT id FROM chunks WHERE document_id = ? ORDER BY seq", (old_doc,)
            )
        ]
        # stage 1 learns the old chunks; promotion records the loss each had when learned
        _train(model, tok, [t for t, r in zip(OLD, REPEATS, strict=True) for _ in range(r)], 6)
        learned = _score(model, tok, db, ids)
        with transaction(db):
            documents.mark_trained(db, ids, 1, losses=learned)
            documents.replay_add(db, "default", ids, capacity=100, stage_id=1)
            adapters.register(db, "v0001", str(tmp_path / "v1"), stage_id=1)
        # stage 2 learns new data; the scorer then scores the buffer under the new adapter
        _train(model, tok, NEW, 15)
        current = _score(model, tok, db, ids)
        with transaction(db):
            adapters.register(db, "v0002", str(tmp_path / "v2"), parent_version="v0001")
            adapters.set_current(db, "v0002", reason="test")
            documents.put_scores(db, "v0002", current)
            documents.insert_document(
                db, track="default", path="/inbox/new.txt", content_hash="new", size=1,
                mtime=0.0, fmt="text", chunks=[documents.ChunkIn(NEW[1], 30, "train")],
            )  # fmt: skip
        plan = planning.plan_stage(cfg, db)
    finally:
        db.conn.close()

    rise = [current[c] - learned[c] for c in ids]
    assert max(rise) > 1.0  # stage 2 really made the model forget something
    assert plan is not None
    assert plan["parent_version"] == "v0002"
    assert plan["replay_budget_tokens"] == 30  # ratio 1.0 x 30 new tokens -> 3 chunks of 10
    by_rise = sorted(range(len(OLD)), key=lambda i: rise[i], reverse=True)
    expected = [ids[i] for i in by_rise[:3]]
    assert plan["replay_chunk_ids"] == expected
    # the new data overwrote the unrelated texts, not the similar vault-code records
    assert {ids.index(c) for c in plan["replay_chunk_ids"]} == {3, 4, 5}
    assert any("6 of 6 candidates scored" in r for r in plan["reasons"])
