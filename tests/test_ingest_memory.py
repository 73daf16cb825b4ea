"""Bounded memory: tokenisation streams, and a batch is bounded in bytes as well as files.

A 5 MB text used to peak at over 1 GB (every token's offsets at once); the RSS test runs
the real pipeline on a multi-MB file in a subprocess and bounds its peak growth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from daemon.config import Config
from daemon.ingest.chunking import _token_windows, load_tokenizer
from daemon.ingest.pipeline import ingest_paths
from tests.ingest_helpers import LOREM, chunks, docs, events_of

ROOT = Path(__file__).resolve().parents[1]
BIG_MB = 3
MAX_PEAK_GROWTH_MIB = 200  # streaming grows ~30 MiB here; encoding the whole text grew ~460
# Peak RSS per MB of one text file, measured between a SMALL_MB and a LARGE_MB file. The
# bytes, the parsed text, the cleaned text, the chunks and a 64 MiB page cache full of
# dirty pages cost ~4 MiB per MB here (a 50 MB file peaked at 342 MB); now ~2.
SMALL_MB, LARGE_MB = 2, 8
MAX_MIB_PER_MB = 3.0
RSS_BOUND_MB, BOUND_AT_MB = 300, 50  # issue #12: a 50 MB file within 300 MB
LINE = "The quick brown fox jumps over the lazy dog near the river bank today.\n"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A real byte-level BPE tokenizer.json, trained in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([LINE * 50, LOREM * 50], trainer=trainer)
    out = tmp_path / "model"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


def test_sliced_token_windows_equal_whole_text_windows(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    text = "".join(f"{i} {LINE}" + ("\n" if i % 7 == 0 else "") for i in range(400))
    text += "Grüße 🌲 " * 50 + "🌲" * 400 + " end"  # a long run with hard cuts only
    for n in (16, 64):
        whole = list(_token_windows(text, n, tok, slice_chars=10**9))
        for slice_chars in (64, 1000):
            sliced = list(_token_windows(text, n, tok, slice_chars=slice_chars))
            assert sliced == whole
    assert all(count <= 64 for count, _ in whole)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from daemon import config as config_mod
    from daemon.ingest.pipeline import ingest_paths

    def peak_kib():
        # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a big
        # parent (pytest with torch loaded: ~930 MB) reports the parent's peak.
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    state, model, inbox, warm = (Path(a) for a in sys.argv[1:5])
    cfg = config_mod.from_dict({"state_dir": str(state), "base_model": str(model)})
    ingest_paths(cfg, [warm])  # imports, tokenizer and store are loaded before measuring
    before = peak_kib()
    summary = ingest_paths(cfg, [inbox])
    after = peak_kib()
    print(json.dumps({"growth_kib": after - before, "peak_kib": after, "summary": summary}))
    """
)


def test_a_multi_megabyte_file_is_ingested_in_bounded_memory_with_its_small_neighbours(
    tmp_path: Path, model_dir: Path
) -> None:
    inbox, warm = tmp_path / "inbox", tmp_path / "warm"
    inbox.mkdir()
    warm.mkdir()
    (warm / "w.txt").write_text(LOREM * 20)
    lines = (f"{i} {LINE}" + ("\n" if i % 8 == 0 else "") for i in range(10**7))
    with open(inbox / "m-big.txt", "w", encoding="utf-8") as fh:
        while fh.tell() < BIG_MB * 1_000_000:
            fh.write(next(lines))
    for name in ("a-small.txt", "z-small.txt"):
        (inbox / name).write_text(f"{name}: {LOREM}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(tmp_path / "state"), str(model_dir), str(inbox), str(warm)]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["summary"]["outcomes"]["ingested"] == 3, result
    assert result["growth_kib"] / 1024 < MAX_PEAK_GROWTH_MIB, result["growth_kib"]


def _write_text_file(path: Path, mb: float) -> None:
    lines = (f"{i} {LINE}" + ("\n" if i % 8 == 0 else "") for i in range(10**8))
    with open(path, "w", encoding="utf-8") as fh:
        while fh.tell() < mb * 1_000_000:
            fh.write("".join(next(lines) for _ in range(1000)))


def _peak_mib(tmp: Path, model_dir: Path, mb: float) -> tuple[float, float]:
    """``(peak RSS, growth over a warmed-up process)`` in MiB of ingesting one ``mb`` file."""
    inbox, warm = tmp / "inbox", tmp / "warm"
    inbox.mkdir(parents=True)
    warm.mkdir()
    (warm / "w.txt").write_text(LOREM * 20)
    _write_text_file(inbox / "big.txt", mb)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = _CHILD.replace(
        '"state_dir": str(state)',
        '"state_dir": str(state), "ingest": {"max_file_bytes": 100_000_000}',
    )
    args = [str(tmp / "state"), str(model_dir), str(inbox), str(warm)]
    proc = subprocess.run(
        [sys.executable, "-c", child, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["summary"]["outcomes"]["ingested"] == 1, result
    return result["peak_kib"] / 1024, result["growth_kib"] / 1024


def test_peak_memory_grows_slowly_with_file_size(tmp_path: Path, model_dir: Path) -> None:
    small_peak, _ = _peak_mib(tmp_path / "small", model_dir, SMALL_MB)
    large_peak, large_growth = _peak_mib(tmp_path / "large", model_dir, LARGE_MB)
    per_mb = (large_peak - small_peak) / (LARGE_MB - SMALL_MB)
    figures = {"small": small_peak, "large": large_peak, "growth": large_growth, "per_mb": per_mb}
    assert per_mb < MAX_MIB_PER_MB, figures
    assert large_peak + (BOUND_AT_MB - LARGE_MB) * per_mb <= RSS_BOUND_MB, figures


def test_a_batch_is_bounded_in_bytes_so_a_big_file_is_committed_alone(cfg: Config) -> None:
    cfg.ingest.batch_max_bytes = 4000
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True)
    for name in ("a.txt", "b.txt", "z.txt"):
        (inbox / name).write_text(f"{name}: {LOREM}")
    (inbox / "m.txt").write_text(LOREM * 40)  # about 6.5 kB, over the bound on its own
    summary = ingest_paths(cfg, [inbox], batch_size=256)
    assert summary["outcomes"]["ingested"] == 4
    per_commit = [json.loads(e["data"])["documents"] for e in events_of(cfg, "ingest.ingested")]
    assert per_commit == [2, 1, 1]  # a+b, then m alone, then z
    assert len(docs(cfg)) == 4


def test_a_big_batch_is_written_with_a_capped_page_cache_that_is_restored(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.ingest import commit
    from store.db import open_db, page_cache_at_most

    seen: list[int] = []
    real = page_cache_at_most

    @contextmanager
    def spy(db: Any, mib: int) -> Iterator[None]:
        with real(db, mib):
            seen.append(int(db.conn.execute("PRAGMA cache_size").fetchone()[0]))
            yield

    monkeypatch.setattr(commit, "BIG_BATCH_BYTES", 3000)
    monkeypatch.setattr(commit, "page_cache_at_most", spy)
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True)
    (inbox / "small.txt").write_text(f"small: {LOREM}")
    (inbox / "big.txt").write_text(LOREM * 40)
    summary = ingest_paths(cfg, [inbox / "small.txt"])
    summary = ingest_paths(cfg, [inbox / "big.txt"])
    assert summary["outcomes"]["ingested"] == 1
    assert seen == [-1024 * commit.BIG_BATCH_CACHE_MIB]  # only the big batch was capped
    stored = [d for d in docs(cfg) if d["path"].endswith("big.txt")]
    assert len(stored) == 1 and stored[0]["n_chunks"] == summary["chunks"] > 1
    assert len(chunks(cfg, stored[0]["id"])) == summary["chunks"]
    with open_db(cfg.db_path, cache_mib=64) as db:
        with page_cache_at_most(db, 8):
            assert db.conn.execute("PRAGMA cache_size").fetchone()[0] == -8192
        assert db.conn.execute("PRAGMA cache_size").fetchone()[0] == -65536
        with page_cache_at_most(db, 128):  # never raised
            assert db.conn.execute("PRAGMA cache_size").fetchone()[0] == -65536
