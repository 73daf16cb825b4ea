"""Chunking by tokens (real tokenizer and byte fallback), the hash split, cleaning rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from daemon.ingest import chunking
from daemon.ingest.chunking import HOLDOUT, TRAIN, Chunker, load_tokenizer, split_of
from daemon.ingest.clean import garbage_ratio, normalise, scrub_pii
from daemon.ingest.parsers import Segment
from daemon.ingest.pipeline import ingest_paths
from tests.ingest_helpers import LOREM, chunks, make_cfg

WORDS = LOREM.split() * 40


def paragraphs(n: int) -> str:
    return "\n\n".join(" ".join(WORDS[i : i + 30]) + f" paragraph {i}." for i in range(n))


def test_byte_fallback_windows_fit_and_cover_the_text() -> None:
    text = paragraphs(40) + " " + "é" * 500  # multi-byte characters at a hard cut
    out = Chunker(64, 0.1, None).chunk([Segment("text", text)])
    assert all(c.n_tokens <= 64 for c in out)
    assert all(c.n_tokens == len(c.text.encode()) for c in out)
    # Nothing lost but whitespace at the cuts.
    assert "".join(c.text for c in out).replace(" ", "").replace("\n", "") == text.replace(
        " ", ""
    ).replace("\n", "")
    # Cuts prefer boundaries: no chunk of the paragraphs starts mid-word.
    words = set(text.split())
    assert all(c.text.split()[0] in words for c in out if not c.text.startswith("é"))


def test_short_document_is_one_train_chunk_even_if_its_hash_says_holdout() -> None:
    # Find a text whose hash lands in holdout at 50 %, then check the one-chunk rule.
    text = next(
        f"short fact {i}" for i in range(1000) if split_of(f"short fact {i}", 0.5) == HOLDOUT
    )
    (chunk,) = Chunker(256, 0.5, None).chunk([Segment("text", text)])
    assert chunk.split == TRAIN


def test_split_is_deterministic_and_close_to_the_fraction() -> None:
    texts = [f"chunk number {i} with some words" for i in range(4000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert splits == [split_of(t, 0.1) for t in texts]
    share = splits.count(HOLDOUT) / len(splits)
    assert 0.08 < share < 0.12
    assert all(split_of(t, 0.0) == TRAIN for t in texts[:100])


def test_identical_chunk_text_always_gets_the_same_split() -> None:
    a = Chunker(64, 0.3, None).chunk([Segment("text", paragraphs(30))])
    b = Chunker(64, 0.3, None).chunk([Segment("text", paragraphs(30) + "\n\nextra tail")])
    same = {c.text: c.split for c in a}
    assert any(c.split == HOLDOUT for c in a)
    assert all(same[c.text] == c.split for c in b if c.text in same)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A real (tiny) BPE tokenizer.json, trained in milliseconds on the test text."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([paragraphs(20)], trainer=trainer)
    out = tmp_path / "model"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


def test_real_tokenizer_windows_respect_the_token_budget(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    assert tok is not None and load_tokenizer(model_dir) is tok  # cached per process
    text = paragraphs(30)
    out = Chunker(48, 0.1, tok).chunk([Segment("text", text)])
    assert len(out) > 5
    for c in out:
        assert c.n_tokens <= 48
        assert len(tok.encode(c.text, add_special_tokens=False).ids) <= 48
        assert c.text in text


def test_real_tokenizer_never_splits_or_duplicates_characters(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    text = "\n".join(
        f"Zeile {i}: Grüße aus Köln 🌲🌲 naïve café — " + "é" * (i % 7) for i in range(60)
    )
    text += " " + "🌲" * 200  # one long run of 4-byte characters: only hard cuts possible
    out = Chunker(40, 0.1, tok).chunk([Segment("text", text)])
    assert all(c.n_tokens <= 40 for c in out)
    squash = "".join(text.split())
    assert "".join("".join(c.text.split()) for c in out) == squash


def test_pipeline_uses_the_base_models_tokenizer(state_dir: Path, model_dir: Path) -> None:
    cfg = make_cfg(state_dir, chunk_tokens=32)
    cfg.base_model = str(model_dir)
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True)
    text = paragraphs(10)
    (inbox / "doc.txt").write_text(text)
    ingest_paths(cfg, [inbox])
    tok = load_tokenizer(model_dir)
    rows = chunks(cfg)
    assert len(rows) > 3
    assert sum(r["n_tokens"] for r in rows) < len(text.encode())  # BPE, not bytes
    assert all(len(tok.encode(r["text"]).ids) <= 32 for r in rows)


def test_missing_or_broken_tokenizer_falls_back_to_bytes(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path / "nope") is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert load_tokenizer(tmp_path) is None
    assert str(tmp_path / "tokenizer.json") not in chunking._tokenizers


def test_normalise_whitespace_keeps_indentation() -> None:
    raw = "\ufeffTitle\u00a0here \r\n\r\n\r\n\r\n    indented code();\t\n\u2028next"
    assert normalise(raw) == "Title here\n\n    indented code();\n\nnext"


def test_garbage_ratio_counts_controls_and_replacement_chars() -> None:
    assert garbage_ratio("plain text\n") == 0.0
    assert garbage_ratio("\x00\x01ab") == 0.5
    assert garbage_ratio("\ufffd\ufffdab") == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail bob@example.org now", "mail [EMAIL] now"),
        ("call 555-123-4567", "call [PHONE]"),
        ("call +1 (555) 123 4567 today", "call [PHONE] today"),
        ("on 2023-12-31 at noon", "on 2023-12-31 at noon"),
        ("pi is 3.14159265", "pi is 3.14159265"),
        ("see 10.0.0.1 and 1234567", "see 10.0.0.1 and 1234567"),
    ],
)
def test_scrub_pii_cases(text: str, expected: str) -> None:
    assert scrub_pii(text) == expected
