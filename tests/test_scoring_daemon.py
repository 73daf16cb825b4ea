"""The daemon scores new data before it trains: a surprise trigger can judge it.

Acceptance test of the scorer wiring: a real daemon (:class:`Service`, in process), the
tiny real model, the real scorer subprocess and a real store. One document has already
been learned (its holdout is the "known knowledge" yardstick); a new document of gibberish
is far more surprising. With ``surprise`` (``unscored = "wait"``) as the only trigger, the
policy cannot fire until the scorer has run; the daemon runs it on its own, and the trigger
then fires, before any stage is planned on the new data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlite_utils

from daemon.scheduling.decisions import EVENT_KIND, explain_next
from daemon.service import Service
from daemon.training.scoring import Scorer
from store import documents, events, stages
from store.db import open_db, transaction
from tests.fixtures_model import add_doc, make_tiny_cfg

pytestmark = pytest.mark.slow

KNOWN = [
    "Return the number of items in the list. If the argument is omitted, return zero.",
    "Raise a ValueError if the value is not found in the sequence of items.",
    "Open the file and return a corresponding file object for reading and writing.",
    "Return a new dictionary with keys from the iterable and values set to value.",
]
KNOWN_HOLDOUT = [
    "Return the number of elements in the set. If the set is empty, return zero.",
    "Raise a KeyError if the key is not found in the dictionary of values.",
]
GIBBERISH = ["zq xv kw pj qqz vvx jjk wq " * 4, "kkq zzv xqj wpz jjq vxk qzw " * 4]


def _learned_document(db: sqlite_utils.Database) -> None:
    """A document a promoted stage has learned: train chunks trained and in the replay
    buffer, so its holdout counts as learned."""
    doc_id = add_doc(db, KNOWN, holdout=KNOWN_HOLDOUT)
    ids = [
        int(r["id"])
        for r in db.query(
            "SELECT id FROM chunks WHERE document_id = ? AND split = 'train'", [doc_id]
        )
    ]
    with transaction(db):
        sid = stages.create(db, {"new_chunk_ids": ids})
        stages.set_status(db, sid, stages.PROMOTED, reason="learned before this test")
        documents.mark_trained(db, ids, sid)
        documents.replay_add(db, "default", ids, capacity=100, stage_id=sid)


def _wait_for_event(
    db: sqlite_utils.Database, kind: str, pred: Callable[[dict], bool], timeout: float = 240.0
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events.recent(db, kind_prefix=kind, limit=50):
            if pred(e):
                return e
        time.sleep(0.5)
    raise AssertionError(f"no {kind} event matched within {timeout:.0f}s")


def test_daemon_scores_new_data_so_surprise_fires_before_training(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = make_tiny_cfg(
        state,
        tiny_seed_model,
        serving={"mode": "none"},
        metrics={"enabled": False},
        training={"prewarm": False, "epochs": 1.0, "max_seq_len": 128, "batch_tokens": 256},
        policy={"trigger": {"name": "surprise", "ratio": 1.5, "unscored": "wait"}},
    )
    db = open_db(cfg.db_path)
    _learned_document(db)
    add_doc(db, GIBBERISH)
    before = explain_next(cfg, db, record=False)
    assert before["fire"] is False
    assert any("waiting for the scorer" in r for r in before["reasons"]), before["reasons"]

    service = Service(cfg, training=True)
    try:
        service.start()
        fired = _wait_for_event(db, EVENT_KIND, lambda e: e["data"].get("fire") is True)
    finally:
        service.stop(grace_s=30.0)
    scored = events.recent(db, kind_prefix="score.done", limit=10)
    assert scored, "the daemon never ran the scorer"
    first_score = min(e["id"] for e in scored)
    assert first_score < fired["id"]  # scored first, then the trigger could judge
    assert any("pending data is new knowledge" in r for r in fired["data"]["reasons"]), fired
    planned = events.recent(db, kind_prefix="stage.planned", limit=10)
    new_stages = [e for e in planned if e["id"] > first_score]
    assert all(e["id"] > fired["id"] for e in new_stages)  # no stage trained on it before
    db.conn.close()


def test_scorer_runs_only_for_policies_that_read_scores(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    """fifo selection, uniform replay and a trigger without surprise read no scores: no
    scorer run, no event, no cost."""
    state = tmp_path / "state"
    state.mkdir()
    cfg = make_tiny_cfg(
        state,
        tiny_seed_model,
        policy={"selection": {"name": "fifo"}, "replay": {"name": "uniform"}},
    )
    db = open_db(cfg.db_path)
    add_doc(db, GIBBERISH)
    assert Scorer(cfg).run(db) is None
    assert events.recent(db, kind_prefix="score.") == []
    db.conn.close()


def test_scorer_budget_bounds_a_run_and_the_rest_follows(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = make_tiny_cfg(
        state,
        tiny_seed_model,
        training={"max_seq_len": 128},
        policy={"trigger": {"name": "surprise", "ratio": 1.5}},
    )
    db = open_db(cfg.db_path)
    add_doc(db, GIBBERISH + KNOWN)
    pending = [int(c["id"]) for c in documents.pending_chunks(db, "default")]
    scorer = Scorer(cfg, max_chunks=4)
    first = scorer.run(db)
    assert first is not None and first.rc == 0 and first.more
    assert first.chunk_ids == pending[:4]
    assert set(documents.scores(db, None, pending)) == set(pending[:4])
    second = scorer.run(db)
    assert second is not None and second.rc == 0 and not second.more
    assert set(documents.scores(db, None, pending)) == set(pending)
    assert scorer.run(db) is None  # everything scored: nothing to do
    done = events.recent(db, kind_prefix="score.done")
    assert [e["data"]["chunks"] for e in done] == [2, 4]
    db.conn.close()
