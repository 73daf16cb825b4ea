"""``self`` augmentation against the real vLLM CPU server (the session's tiny seed model).

The tiny model writes gibberish; that is fine. What is checked is the path: the prompts
reach the served stable name with the server's key, the busy probe reads the real
``/metrics``, generated text is filtered and stored with lineage, and it stays out of
the user's data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.augment import augment_pending
from daemon.config import Config
from daemon.serving.vllm import ManagedVLLM
from daemon.textfilter import garbage_ratio, normalise
from store import documents, events, synthetic
from store.db import open_db, transaction
from tests.fixtures_model import add_doc, make_tiny_cfg

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TEXTS = [
    "The Vell river rises in the Ashen hills. It flows north for 212 kilometres.",
    "Mira Okafor was born in Lagos in 1987. She studied marine biology at Kiel.",
]


def test_self_rewrites_through_the_served_model(
    tmp_path: Path, tiny_seed_model: Path, serving_cfg: Config, vllm_server: ManagedVLLM
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(vllm_server.api_key + "\n", encoding="utf-8")
    cfg = make_tiny_cfg(
        tmp_path / "state",
        tiny_seed_model,
        serving={"mode": "none"},
        augment={
            "method": "self",
            "endpoint": vllm_server.url,
            # The base model's own name: the stable name exists only once a swapper has
            # reconciled this server (the daemon does at start), which would change what
            # the serving tests sharing this server see first.
            "model": str(serving_cfg.resolved_base_model()),
            "api_key_file": str(key_file),
            "k": 2,
            "max_new_tokens": 24,
            "temperature": 1.0,
            "min_chars": 2,
            "token_budget": 10_000,
            "prompts": {"paraphrase": "{text}\nIn other words,", "qa": "{text}\nQ:"},
        },
    )
    with open_db(cfg.db_path) as db:
        with transaction(db):
            doc = add_doc(db, TEXTS, holdout=["A held-out line. It stays out."])
        pending_before = documents.pending_tokens(db, cfg.track)
        report = augment_pending(cfg, db)
        assert report.errors == [], report.errors
        assert report.chunks >= 1 and report.tokens_generated > 0, report.summary()
        assert report.kept >= 1, report.summary()
        sources = [c["id"] for c in documents.pending_chunk_facts(db, cfg.track)]
        rows = synthetic.for_sources(db, sources)
        assert {r["id"] for r in rows} == set(report.chunk_ids)
        for r in rows:
            chunk = documents.chunks_by_ids(db, [r["id"]])[0]
            assert chunk["document_id"] == doc and chunk["split"] == synthetic.SYNTHETIC
            assert normalise(chunk["text"]) == chunk["text"] and len(chunk["text"]) >= 2
            assert garbage_ratio(chunk["text"]) <= cfg.ingest.max_garbage_ratio
            assert r["method"] == "self" and r["variant"].startswith(("paraphrase", "qa"))
        assert documents.pending_tokens(db, cfg.track) == pending_before
        (event,) = events.recent(db, kind_prefix="augment.")
        assert event["data"]["kept"] == report.kept


def test_self_with_a_wrong_key_is_an_error_not_a_crash(
    tmp_path: Path, tiny_seed_model: Path, vllm_server: ManagedVLLM
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("not-the-key", encoding="utf-8")
    cfg = make_tiny_cfg(
        tmp_path / "state",
        tiny_seed_model,
        serving={"mode": "none"},
        augment={
            "method": "self",
            "endpoint": vllm_server.url,
            "api_key_file": str(key_file),
            "busy_check": False,
        },
    )
    with open_db(cfg.db_path) as db:
        with transaction(db):
            add_doc(db, TEXTS[:1])
        report = augment_pending(cfg, db)
        assert report.chunks == 0 and "HTTP 401" in report.stopped
        assert len(synthetic.unaugmented(db, cfg.track, "self", limit=10)) == 1
