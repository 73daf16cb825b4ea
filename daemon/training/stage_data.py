"""A stage's data: the plan's chunks as examples, packed micro-batches, general-text rows.

Everything here is a pure function of the plan (and the store's chunks), so a stage that
is killed and resumed sees exactly the batches it would have seen: the epoch order and
the general-text windows depend only on (seed, stage id, micro-batch index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.config import TrainingConfig
from daemon.training import data as data_mod
from daemon.training import fsutil
from daemon.training.data import Example, Row
from daemon.training.report import StageFailed, emit
from store import documents
from store.contracts import StagePlan

SYNTHETIC = "synthetic"  # Example.source of synthetic study text
NEWS = ("new", SYNTHETIC)  # the sources general-text mixing is proportional to


@dataclass
class Prepared:
    """One micro-batch, collated, with the counts the loop needs."""

    col: data_mod.Collated
    labels_count: int
    data_tokens: int  # new + synthetic + replay tokens (general-mix rows excluded)


@dataclass
class StageData:
    """Training batches and evaluation sets of one stage.

    ``synthetic`` (study text made from the new chunks, :mod:`store.synthetic`) trains
    with ``new`` and ``replay`` and is in no evaluation set: ``holdout``, ``retention``
    and the new-data fallback are built from user chunks only.
    """

    new: list[Example]
    replay: list[Example]
    holdout: list[Example]
    retention: list[Example]
    batches: list[list[Row]]
    stage_id: int
    seed: int
    pad_id: int
    general_ids: list[int] = field(default_factory=list)
    general_mix: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    synthetic: list[Example] = field(default_factory=list)

    def sized_tokens(self) -> int:
        """The new + synthetic tokens a stage's length is sized on (replay excluded)."""
        return sum(map(len, self.new)) + sum(map(len, self.synthetic))

    def batch_at(self, micro: int) -> Prepared:
        """The ``micro``-th micro-batch of the whole stage (epochs back to back)."""
        per_epoch = len(self.batches)
        epoch, idx = divmod(micro, per_epoch)
        rows = self.batches[data_mod.epoch_order(per_epoch, epoch, self.seed)[idx]]
        col = data_mod.collate(rows + self.general_rows(rows, micro), self.pad_id)
        labels = sum(x != data_mod.IGNORE for r in col.labels for x in r)
        return Prepared(col, labels, sum(r.length for r in rows))

    def general_rows(self, rows: list[Row], micro: int) -> list[Row]:
        """Fresh general-text rows for one micro-batch: ``general_mix ×`` its new and
        synthetic tokens,
        cut at the batch's longest row (no extra padding), at a position that is a pure
        function of (stage, micro-batch) so a resumed stage sees the same text."""
        ids = self.general_ids
        if not ids:
            return []
        new_tok = sum(len(e) for r in rows for e in r.examples if e.source in NEWS)
        width = max(2, min(max(r.length for r in rows), len(ids)))
        out = []
        for k in range(math.ceil(self.general_mix * new_tok / width)):
            start = ((micro * 31 + k) * 7919 + self.stage_id * 104729) % max(1, len(ids) - width)
            piece = ids[start : start + width]
            out.append(Row([Example(piece, list(piece), -1, "general")]))
        return out


def as_eval(examples: list[Example]) -> list[Example]:
    """The same token windows, tagged as evaluation examples."""
    return [Example(e.ids, e.labels, e.chunk_id, "eval") for e in examples]


def encode_ids(
    db: sqlite_utils.Database,
    tok: Any,
    ids: list[int],
    source: str,
    max_len: int,
    *,
    warn: bool = True,
) -> list[Example]:
    """Examples of the store chunks ``ids``; a malformed chat record is skipped (and said,
    unless ``warn`` is False: chunks only scored, not trained, are not this stage's news)."""
    out: list[Example] = []
    for chunk in documents.chunks_by_ids(db, ids):
        try:
            out.extend(data_mod.encode_chunk(tok, chunk, source, max_len))
        except ValueError as exc:
            if warn:
                emit("warning", chunk_id=chunk["id"], message=str(exc))
    return out


def general_ids(tok: Any, plan: StagePlan) -> list[int]:
    """Token stream of the general text mixed into training (empty when off)."""
    path = plan.general_replay
    if plan.general_mix <= 0 or not path or not Path(path).is_file():
        return []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return list(tok(text, add_special_tokens=False)["input_ids"])


def load(
    db: sqlite_utils.Database,
    plan: StagePlan,
    tok: Any,
    hp: TrainingConfig,
    *,
    stage_id: int,
    pad_id: int,
) -> StageData:
    """Examples for training (new + synthetic + replay) and evaluation (user chunks
    only), packed into micro-batches."""
    max_len = hp.max_seq_len
    new = encode_ids(db, tok, plan.new_chunk_ids, "new", max_len)
    if not new:
        raise StageFailed("the plan's new chunks produced no trainable tokens")
    syn = encode_ids(db, tok, plan.synthetic_chunk_ids, SYNTHETIC, max_len)
    replay = encode_ids(db, tok, plan.replay_chunk_ids, "replay", max_len)
    retention = encode_ids(db, tok, plan.retention_chunk_ids, "eval", max_len)
    rows = data_mod.pack(new + syn + replay, max_len)
    data = StageData(
        new=new,
        replay=replay,
        holdout=encode_ids(db, tok, plan.holdout_chunk_ids, "eval", max_len),
        retention=retention + as_eval(replay),
        batches=data_mod.micro_batches(rows, hp.batch_tokens),
        stage_id=stage_id,
        seed=hp.seed,
        pad_id=pad_id,
        general_ids=general_ids(tok, plan),
        general_mix=plan.general_mix,
        synthetic=syn,
    )
    data.stats = _stats(data, rows)
    return data


def _stats(data: StageData, rows: list[Row]) -> dict[str, Any]:
    """Token counts and padding share, for the manifest and ``data.json``."""
    new_tok = sum(map(len, data.new))
    syn_tok = sum(map(len, data.synthetic))
    replay_tok = sum(map(len, data.replay))
    general_tok = int(data.general_mix * (new_tok + syn_tok)) if data.general_ids else 0
    filler = sum(len(b) * max(r.length for r in b) - sum(r.length for r in b) for b in data.batches)
    return {
        "new_tokens": new_tok,
        "synthetic_tokens": syn_tok,
        "replay_tokens": replay_tok,
        "rows": len(rows),
        "micro_batches": len(data.batches),
        "general_tokens_per_epoch": general_tok,
        "pad_fraction": filler / max(1, filler + new_tok + syn_tok + replay_tok + general_tok),
    }


def write_data_json(stage_dir: Path, data: StageData) -> None:
    """What was packed where (``data.json`` in the stage dir), for inspection and tests."""
    rows = [r for b in data.batches for r in b]
    fsutil.write_json(
        stage_dir / "data.json",
        {
            **data.stats,
            "rows_chunk_ids": [[e.chunk_id for e in r.examples] for r in rows],
            "rows_sources": [[e.source for e in r.examples] for r in rows],
        },
    )
