"""Synthetic study text reaches a stage's training data and never its evaluation: a real
store, the real augmentation step, the real plan and the stage's real data loading."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon.augment import augment_pending
from daemon.config import Config
from daemon.serving import promotion
from daemon.training import finish, hparams, loop, runner, stage_data, stage_eval
from daemon.training import plan as plan_mod
from store import adapters, documents, stages, synthetic
from store.contracts import StagePlan
from store.db import open_db, transaction
from tests.fixtures_model import add_doc, make_tiny_cfg

NEW = [
    "Mira Okafor was born in Lagos in 1987. She studied marine biology at Kiel. "
    "Her first paper described coral spawning. She now leads a lab in Cape Town.",
    "The Vell river rises in the Ashen hills. It flows north for 212 kilometres. "
    "Its largest tributary is the Orm. The Orm joins it at Dunmere.",
]
OLD = ["The lighthouse at Brask was lit in 1871. Its keeper kept a log of every storm."]


def make_cfg(tmp_path: Path, base: Path, *, passes: float = 8.0, **policy: Any) -> Config:
    training = {"passes": passes, "min_steps": 0, "max_seq_len": 128, "batch_tokens": 256}
    return make_tiny_cfg(
        tmp_path / "state",
        base,
        augment={"method": "permute", "k": 2},
        serving={"mode": "none"},
        policy={"replay": {"name": "uniform", "ratio": 1.0}, **policy},
        training={**training, "eval_every": 0, "checkpoint_every": 1000},
    )


def promote_with(cfg: Config) -> finish.PromoteFn:
    """Serving's promotion as the service injects it (serving.mode = none: pointer only)."""
    return lambda version, reason: promotion.promote(cfg, version, reason)


def ids_of(examples: list[Any]) -> set[int]:
    return {int(e.chunk_id) for e in examples}


@pytest.fixture
def tok(tiny_seed_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_seed_model)


def test_synthetic_text_trains_with_the_new_data_and_is_never_evaluated(
    tmp_path: Path, tiny_seed_model: Path, tok: Any
) -> None:
    cfg = make_cfg(tmp_path, tiny_seed_model)
    with open_db(cfg.db_path) as db:
        with transaction(db):
            old = add_doc(db, OLD, holdout=["Brask has a lighthouse. It is old."], path="/i/o")
            old_ids = [c["id"] for c in documents.pending_chunk_facts(db, cfg.track)]
            documents.mark_trained(db, old_ids, stage_id=0)
            documents.replay_add(db, cfg.track, old_ids, capacity=10)
            new = add_doc(db, NEW, holdout=["Mira studied at Kiel. The Orm is a river."])
        report = augment_pending(cfg, db)
        syn = synthetic.for_sources(
            db, [c["id"] for c in documents.pending_chunk_facts(db, "default")]
        )
        assert report.kept == len(syn) == 4 and old != new

        sid = plan_mod.write_plan(cfg, db)
        assert sid is not None
        plan = StagePlan.from_json((stages.get(db, sid) or {})["plan"])
        syn_ids = [int(r["id"]) for r in syn]
        # the plan carries them, as their own list, with their tokens and hash
        assert plan.synthetic_chunk_ids == syn_ids
        assert plan.synthetic_tokens == sum(int(r["n_tokens"]) for r in syn)
        assert plan.synthetic_sha256 == documents.chunks_sha256(db, syn_ids)
        others = [plan.new_chunk_ids, plan.replay_chunk_ids, plan.holdout_chunk_ids]
        others += [plan.retention_chunk_ids, plan.score_chunk_ids]
        assert all(set(ids).isdisjoint(syn_ids) for ids in others)
        assert plan.retention_chunk_ids and plan.replay_chunk_ids and plan.holdout_chunk_ids
        # the replay budget stays on user tokens
        assert plan.replay_budget_tokens == plan.new_tokens
        assert any(r.startswith("synthetic: 4 texts") for r in plan.reasons)

        hp = hparams.from_plan(plan.hparams)
        data = stage_data.load(db, plan, tok, hp, stage_id=sid, pad_id=0)
        check_training_set(data, plan, syn_ids)
        check_eval_sets(db, plan, tok, data, syn_ids)
        never_offered_to_replay(cfg, db, sid, plan, syn_ids)


def check_training_set(data: stage_data.StageData, plan: StagePlan, syn_ids: list[int]) -> None:
    assert ids_of(data.synthetic) == set(syn_ids)
    trained: Counter[str] = Counter()  # tokens per source over one epoch of the packed batches
    for batch in data.batches:
        for row in batch:
            for e in row.examples:
                trained[e.source] += len(e)
                assert (e.source == "synthetic") == (e.chunk_id in syn_ids)
    syn_tokens = sum(map(len, data.synthetic))
    assert trained["synthetic"] == syn_tokens == data.stats["synthetic_tokens"] > 0
    assert trained["new"] == data.stats["new_tokens"] > 0
    assert trained["replay"] == data.stats["replay_tokens"] > 0
    # the stage is sized on new + synthetic tokens (8 passes), not on replay
    sized = data.stats["new_tokens"] + syn_tokens
    assert data.sized_tokens() == sized
    hp = hparams.from_plan(plan.hparams)
    assert loop.total_steps(hp, len(data.batches), data.sized_tokens()) == -(-8 * sized // 256)


def check_eval_sets(
    db: Any, plan: StagePlan, tok: Any, data: stage_data.StageData, syn_ids: list[int]
) -> None:
    hp = hparams.from_plan(plan.hparams)
    sets = stage_eval.loss_sets(plan, tok, data, hp.max_seq_len)
    assert sets["new_loss"] and sets["retention_loss"]
    for name, examples in sets.items():
        assert ids_of(examples).isdisjoint(syn_ids), name
    # no holdout: the gate falls back to the new train chunks, still without synthetic text
    no_holdout = plan.model_copy(update={"holdout_chunk_ids": []})
    fallback = stage_data.load(db, no_holdout, tok, hp, stage_id=1, pad_id=0)
    fb_sets = stage_eval.loss_sets(no_holdout, tok, fallback, hp.max_seq_len)
    assert ids_of(fb_sets["new_loss"]) == set(plan.new_chunk_ids)


def never_offered_to_replay(
    cfg: Config, db: Any, sid: int, plan: StagePlan, syn_ids: list[int]
) -> None:
    """The runner's promotion marks the new chunks trained and offers only them to the
    replay buffer."""
    out = Path(plan.output_dir)
    out.mkdir(parents=True)
    with transaction(db):
        adapters.register(db, plan.output_version, str(out), stage_id=sid)
        stages.set_status(db, sid, stages.EVALUATED, candidate_version=plan.output_version)

    def pointer_only(version: str, reason: str) -> None:  # no adapter files in this test
        adapters.set_current(db, version, track=cfg.track, reason=reason)

    res = finish.promote_stage(cfg, db, sid, "test", promote=pointer_only)
    assert res.status == stages.PROMOTED, res
    buffered = {int(r["chunk_id"]) for r in documents.replay_rows(db, cfg.track)}
    assert set(plan.new_chunk_ids) <= buffered and buffered.isdisjoint(syn_ids)


@pytest.mark.slow
def test_a_real_stage_trains_on_synthetic_text_and_is_sized_by_it(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    import json

    gate = {"name": "gate", "min_new_improvement": 0.0, "max_general_regression": 1.0}
    cfg = make_cfg(tmp_path, tiny_seed_model, passes=3.0, promotion=gate)
    with open_db(cfg.db_path) as db:
        with transaction(db):
            add_doc(db, NEW, holdout=["Mira studied at Kiel. The Orm is a river."])
        assert augment_pending(cfg, db).kept == 4
        res = runner.run_stage(cfg, db, promote=promote_with(cfg))
        assert res.status in ("promoted", "rejected"), res
        plan = StagePlan.from_json((stages.get(db, res.stage_id or 0) or {})["plan"])
        packed = json.loads((Path(plan.stage_dir) / "data.json").read_text())
        sources = Counter(s for row in packed["rows_sources"] for s in row)
        assert sources["synthetic"] == 4 and sources["new"] == 2
        sized = packed["new_tokens"] + packed["synthetic_tokens"]
        assert packed["synthetic_tokens"] > packed["new_tokens"] > 0
        training = res.metrics["training"]
        assert training["total_steps"] == training["steps"] == -(-3 * sized // 256)
