"""Augmentation: pure methods, the [augment] section, and synthetic text with lineage.

Real SQLite files on disk and the real runner; the only stand-ins are a clock (for the
time budget) and a closed local port (a real unreachable server).
"""

from __future__ import annotations

import random
import socket
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest

from daemon import config as config_mod
from daemon.augment import augment_pending
from daemon.augment import generate as augment_generate
from daemon.config import Config, ConfigError
from daemon.scheduling.planning import plan_stage
from daemon.textfilter import garbage_ratio, normalise
from daemon.training.plan import retention_ids
from policies import augment as methods
from policies import base as policy_base
from store import documents, events, synthetic
from store.db import open_db, transaction
from tests.fixtures_model import add_doc

BIO = (
    "Mira Okafor was born in Lagos in 1987. She studied marine biology at Kiel. "
    "Her first paper described coral spawning. She now leads a lab in Cape Town."
)
TWO_PARAGRAPHS = (
    "The Vell river rises in the Ashen hills. It flows north for 212 kilometres.\n\n"
    "Its largest tributary is the Orm. The Orm joins it at Dunmere."
)
CODE_AND_PROSE = (
    "Install it first. Then run it.\n\ndef main():\n    return 1\n\nDone at last. Good."
)


def sentence_multiset(text: str) -> Counter[str]:
    return Counter(s for block in methods.units(text) for s in block)


def make_cfg(state_dir: Path, **augment: Any) -> Config:
    return config_mod.from_dict(
        {"state_dir": str(state_dir), "serving": {"mode": "none"}, "augment": augment}
    )


# --- pure methods ----------------------------------------------------------------------
@pytest.mark.parametrize("text", [BIO, TWO_PARAGRAPHS, CODE_AND_PROSE])
def test_permute_is_deterministic_and_keeps_every_sentence(text: str) -> None:
    method = policy_base.build("augment", {"name": "permute"})
    a = method.expand(text, 3, random.Random(7))
    b = method.expand(text, 3, random.Random(7))
    assert a == b and len(a) == 3
    assert len({v.text for v in a}) == 3
    assert all(v.text != methods.render(methods.units(text)) for v in a)
    for v in a:
        assert sentence_multiset(v.text) == sentence_multiset(text)
    assert [v.text for v in method.expand(text, 3, random.Random(8))] != [v.text for v in a]


def test_permute_moves_code_blocks_whole_and_skips_single_sentences() -> None:
    method = policy_base.build("augment", {"name": "permute"})
    for v in method.expand(CODE_AND_PROSE, 4, random.Random(0)):
        assert "def main():\n    return 1" in v.text
    assert method.expand("Only one sentence here.", 3, random.Random(0)) == []
    fixed = policy_base.build(
        "augment", {"name": "permute", "shuffle_paragraphs": False, "shuffle_sentences": False}
    )
    assert fixed.expand(TWO_PARAGRAPHS, 3, random.Random(0)) == []


def test_edit_keeps_names_and_figures_and_varies_only_the_filler() -> None:
    method = policy_base.build("augment", {"name": "edit", "p_delete": 0.5, "p_insert": 0.3})
    a = method.expand(TWO_PARAGRAPHS, 6, random.Random(3))
    assert a == method.expand(TWO_PARAGRAPHS, 6, random.Random(3)) and len(a) == 6
    assert len({v.text for v in a}) == 6

    def words(text: str) -> list[str]:
        return [w.strip(".,") for w in text.split()]

    names = ["Vell", "Ashen", "212", "Orm", "Dunmere"]
    filler = set(words(TWO_PARAGRAPHS))
    for v in a:
        for name in names:  # every name and figure survives, as often as in the source
            assert words(v.text).count(name) == words(TWO_PARAGRAPHS).count(name)
        assert set(words(v.text)) <= filler  # inserted words are the chunk's own
        assert v.text.count("\n\n") == 1  # paragraphs stay apart
    assert any(len(v.text.split()) < len(TWO_PARAGRAPHS.split()) for v in a)  # deletions


def test_edit_copies_code_blocks_unchanged() -> None:
    method = policy_base.build("augment", {"name": "edit", "p_delete": 0.9})
    for v in method.expand(CODE_AND_PROSE, 3, random.Random(0)):
        assert "def main():\n    return 1" in v.text


def test_sentences_are_anchored_on_the_first_sentence() -> None:
    out = policy_base.build("augment", {"name": "sentences"}).expand(BIO, 2, random.Random(0))
    first = "Mira Okafor was born in Lagos in 1987."
    assert [v.text for v in out] == [
        f"{first} She studied marine biology at Kiel.",
        f"{first} Her first paper described coral spawning.",
        f"{first} She now leads a lab in Cape Town.",
    ]
    plain = policy_base.build("augment", {"name": "sentences", "anchor": False, "max_samples": 2})
    assert [v.text for v in plain.expand(BIO, 2, random.Random(0))] == [
        first,
        "She studied marine biology at Kiel.",
    ]


# --- config ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"method": "nope"}, "augment.method: unknown augment policy 'nope'"),
        ({"method": "permute", "params": {"shuffle": True}}, "augment.params.shuffle: unknown"),
        ({"params": {"name": "permute"}}, "augment.params.name: set the method"),
        ({"k": 0}, "augment.k: must be >= 1"),
        ({"token_budget": -1}, "augment.token_budget: must be >= 1"),
        ({"api": "grpc"}, "augment.api: must be one of"),
        ({"prompts": {"qa": "no slot"}}, "augment.prompts.qa: a template must contain {text}"),
        ({"prompts": {"Bad-Label": "{text}"}}, "augment.prompts.Bad-Label: labels are"),
        ({"method": "self", "prompts": {}}, "augment.prompts: method 'self' needs"),
        ({"surprise": 1}, "augment.surprise: unknown key"),
    ],
)
def test_augment_config_errors_name_the_key(augment: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.from_dict({"augment": augment})
    assert str(info.value).startswith(message)


def test_augment_config_defaults_round_trip_and_help() -> None:
    import tomllib

    cfg = config_mod.from_dict({"augment": {"method": "sentences", "params": {"anchor": False}}})
    assert cfg.augment.params == {"anchor": False, "max_samples": 16}
    assert config_mod.from_dict(tomllib.loads(config_mod.to_toml(cfg))).augment == cfg.augment
    keys = {path: text for path, _, text in config_mod.iter_help() if path.startswith("augment.")}
    assert {"augment.method", "augment.k", "augment.prompts", "augment.token_budget"} <= set(keys)
    assert all(keys.values())
    assert config_mod.from_dict({}).augment.method == "none"


# --- store and runner ------------------------------------------------------------------
def live_synthetic(db: Any, source_ids: list[int]) -> list[dict[str, Any]]:
    return synthetic.for_sources(db, source_ids)


def train_ids(db: Any, doc_id: int) -> list[int]:
    rows = db.query(
        "SELECT id FROM chunks WHERE document_id = ? AND split = 'train' ORDER BY id", [doc_id]
    )
    return [int(r["id"]) for r in rows]


def test_permute_run_stores_filtered_text_with_lineage(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, method="permute", k=2)
    with open_db(cfg.db_path) as db:
        with transaction(db):
            doc = add_doc(db, [BIO, TWO_PARAGRAPHS, "Too short."], holdout=[BIO + " Extra."])
        report = augment_pending(cfg, db)
        sources = train_ids(db, doc)
        rows = live_synthetic(db, sources)
        assert report.chunks == 3 and report.kept == 4 == len(rows)
        assert Counter(r["source_chunk_id"] for r in rows) == {sources[0]: 2, sources[1]: 2}
        for r in rows:
            chunk = documents.chunks_by_ids(db, [r["id"]])[0]
            assert chunk["split"] == synthetic.SYNTHETIC and chunk["document_id"] == doc
            assert normalise(chunk["text"]) == chunk["text"] and garbage_ratio(chunk["text"]) == 0
            lin = synthetic.lineage(db, r["id"])
            assert lin is not None and lin["method"] == "permute"
            assert lin["source_chunk_id"] == r["source_chunk_id"]
        (event,) = events.recent(db, kind_prefix="augment.")
        assert event["data"]["kept"] == 4 and len(event["data"]["reasons"]) == 3
        assert augment_pending(cfg, db).chunks == 0  # every pending chunk is done
        ids, tokens = synthetic.ids_and_tokens(db, sources)
        assert ids == [r["id"] for r in rows] and tokens == sum(r["n_tokens"] for r in rows)


def test_synthetic_text_is_never_user_data(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, method="permute", k=3)
    with open_db(cfg.db_path) as db:
        with transaction(db):
            doc = add_doc(db, [BIO, TWO_PARAGRAPHS], holdout=["Held out: one fact. And two."])
            old = add_doc(db, ["An old fact is here. It was learned."], holdout=["Old. Kept."])
            documents.mark_trained(db, train_ids(db, old), stage_id=1)

        def user_view() -> tuple[Any, ...]:
            return (
                documents.status_counts(db, cfg.track),
                documents.pending_tokens(db, cfg.track),
                documents.oldest_pending_train_at(db, cfg.track),
                documents.pending_chunk_facts(db, cfg.track),
                documents.pending_chunk_facts(db, cfg.track, split="holdout"),
                documents.learned_holdout(db, cfg.track),
                retention_ids(db, cfg.track, set(), 0),
            )

        before = user_view()
        report = augment_pending(cfg, db)
        assert report.kept == 6
        assert user_view() == before
        plan = plan_stage(cfg, db)
        assert plan is not None
        planned = {*plan["new_chunk_ids"], *plan["replay_chunk_ids"], *plan["holdout_chunk_ids"]}
        assert planned.isdisjoint(report.chunk_ids)
        assert synthetic.live_counts(db, cfg.track)["permute"]["chunks"] == 6
        assert doc != old


def test_superseding_a_document_removes_its_synthetic_text(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, method="permute", k=2)
    with open_db(cfg.db_path) as db:
        with transaction(db):
            doc = add_doc(db, [BIO], path="/inbox/bio.txt")
        augment_pending(cfg, db)
        source = train_ids(db, doc)
        made = [r["id"] for r in live_synthetic(db, source)]
        assert len(made) == 2
        with transaction(db):
            documents.supersede_document(db, doc)
        assert live_synthetic(db, source) == [] and synthetic.live_counts(db, cfg.track) == {}
        # A new version of the document has the same chunk: it gets its own copies,
        # although the superseded ones have the same text (dedup counts live text only).
        with transaction(db):
            new = add_doc(db, [BIO, "A new closing line. It is here."], path="/inbox/bio2.txt")
        report = augment_pending(cfg, db)
        # two sentences have one other order only
        assert report.kept == 3 and report.dropped.get("duplicate") is None
        assert len(live_synthetic(db, train_ids(db, new)[:1])) == 2
        with transaction(db):
            documents.supersede_document(db, new)
            documents.revive_document(db, doc, "/inbox/bio.txt")
        assert [r["id"] for r in live_synthetic(db, source)] == made


@policy_base.register("augment", "test_echo")
class EchoMethod(methods.MethodBase):
    """A plugin method whose outputs exercise every filter and the deduplication."""

    outputs: ClassVar[list[str]] = [
        "x",  # too short
        "\x00\x01\x02\x03 binary junk \x04\x05\x06\x07\x08\x0e\x0f\x10\x11\x12",  # garbage
        "Mail mira@example.org about   the  coral   paper.\r\n",  # scrubbed, normalised
        "Mail mira@example.org about   the  coral   paper.",  # duplicate after cleaning
        BIO,  # the source itself
        "   ",  # empty
    ]

    def expand(self, text: str, k: int, rng: random.Random) -> list[methods.Variant]:
        return [methods.Variant(f"echo{i}", t) for i, t in enumerate(self.outputs)]


def test_synthetic_text_is_filtered_and_deduplicated(state_dir: Path) -> None:
    cfg = config_mod.from_dict(
        {
            "state_dir": str(state_dir),
            "serving": {"mode": "none"},
            "ingest": {"pii_scrub": True},
            "augment": {"method": "test_echo", "min_chars": 5},
        }
    )
    with open_db(cfg.db_path) as db:
        with transaction(db):
            doc = add_doc(db, [BIO, BIO + " Again."])
        report = augment_pending(cfg, db)
        rows = live_synthetic(db, train_ids(db, doc))
        texts = [documents.chunks_by_ids(db, [r["id"]])[0]["text"] for r in rows]
        assert texts == ["Mail [EMAIL] about   the  coral   paper."]
        # Per chunk: 1 too short, 1 garbage, 1 empty. Chunk 1: BIO is its own text; the
        # mail line is kept once. Chunk 2: both mail lines are live synthetic text, and
        # BIO is the text of another chunk of the same document.
        assert report.dropped == {
            "too_short": 2,
            "garbage": 2,
            "empty": 2,
            "same_as_source": 1,
            "duplicate": 4,
        }
        assert report.kept == 1 and report.chunks == 2


def test_chat_chunks_are_marked_not_augmented(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, method="permute")
    chat = '[{"role": "user", "content": "Hi. Who?"}, {"role": "assistant", "content": "Me."}]'
    with open_db(cfg.db_path) as db:
        with transaction(db):
            add_doc(db, [chat], kind="chat")
        report = augment_pending(cfg, db)
        assert report.chunks == 1 and report.kept == 0
        assert "chat chunk: not augmented" in report.reasons[0]


class StepClock:
    """A fake monotonic clock that advances ``step`` seconds per reading."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_time_budget_stops_a_run_and_the_next_run_continues(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, method="permute", k=1, time_budget_s=25)
    with open_db(cfg.db_path) as db:
        with transaction(db):
            add_doc(db, [f"Fact {i} is true. Fact {i} is old. Fact {i} is here." for i in range(5)])
        first = augment_pending(cfg, db, clock=StepClock(10))
        assert first.chunks == 2 and "time budget" in first.stopped
        second = augment_pending(cfg, db, clock=StepClock(1))
        assert second.chunks == 3 and second.stopped == ""


def test_should_stop_ends_a_run_before_the_next_chunk(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, method="permute", k=1)
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    with open_db(cfg.db_path) as db:
        with transaction(db):
            add_doc(db, [f"Fact {i} is true. Fact {i} is old." for i in range(4)])
        report = augment_pending(cfg, db, should_stop=should_stop)
        assert report.chunks == 2 and report.stopped == "stopping"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("busy_check", "stopped"), [(True, "/metrics unreachable"), (False, "server error")]
)
def test_self_with_an_unreachable_server_records_and_retries_later(
    state_dir: Path, busy_check: bool, stopped: str
) -> None:
    cfg = make_cfg(
        state_dir,
        method="self",
        endpoint=f"http://127.0.0.1:{closed_port()}",
        busy_check=busy_check,
        request_timeout_s=2,
    )
    with open_db(cfg.db_path) as db:
        with transaction(db):
            add_doc(db, [BIO])
        report = augment_pending(cfg, db)
        assert report.chunks == 0 and stopped in report.stopped
        assert bool(report.errors) is not busy_check
        (event,) = events.recent(db, kind_prefix="augment.")
        assert stopped in event["data"]["stopped"]
        assert len(synthetic.unaugmented(db, cfg.track, "self", limit=10)) == 1


def test_self_without_any_server_says_so(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, method="self")
    with open_db(cfg.db_path) as db:
        with transaction(db):
            add_doc(db, [BIO])
        assert "serving.mode = 'none'" in augment_pending(cfg, db).stopped


def test_served_key_file_is_the_one_serving_writes(cfg: Config) -> None:
    from daemon.serving.apikey import load_or_create_api_key

    key = load_or_create_api_key(cfg)  # what the managed server is started with
    assert augment_generate.resolve(cfg).api_key == key
