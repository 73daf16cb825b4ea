"""Hypothesis: any bytes in -> a stored outcome (garbage and malformed JSONL quarantined).

One store per test function (hypothesis reruns the body many times, so each example gets a
fresh file name and its own assertions on the rows it produced).
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import Config
from daemon.ingest.parsers import parse
from daemon.ingest.pipeline import Ingester
from store.db import open_db
from tests.ingest_helpers import make_cfg

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_counter = itertools.count()


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Config, Ingester]]:
    tmp = Path(tempfile.mkdtemp(prefix="evergreen-fuzz-"))
    cfg = make_cfg(tmp / "state")
    Path(cfg.inbox_dir).mkdir(parents=True)
    db = open_db(cfg.db_path)
    try:
        yield cfg, Ingester(cfg, db)
    finally:
        db.conn.close()
        shutil.rmtree(tmp, ignore_errors=True)


def drop(cfg: Config, suffix: str, data: bytes) -> Path:
    path = Path(cfg.inbox_dir) / f"f{next(_counter)}{suffix}"
    path.write_bytes(data)
    return path


def stored(ingester: Ingester, path: Path) -> tuple[dict, dict]:
    conn = ingester.db.conn
    cur = conn.execute("SELECT * FROM files WHERE path = ?", (str(path),))
    frow = dict(zip([c[0] for c in cur.description], cur.fetchone(), strict=True))
    cur = conn.execute("SELECT * FROM documents WHERE id = ?", (frow["document_id"],))
    drow = dict(zip([c[0] for c in cur.description], cur.fetchone(), strict=True))
    return frow, drow


# Invalid UTF-8 for sure: a lone continuation byte first (also rules out every BOM).
garbage_bytes = st.binary(max_size=3000).map(lambda b: b"\x80" + b)


@FUZZ
@given(data=garbage_bytes, suffix=st.sampled_from([".txt", ".md", ".html", ".jsonl"]))
def test_garbage_bytes_are_quarantined(
    env: tuple[Config, Ingester], data: bytes, suffix: str
) -> None:
    cfg, ingester = env
    path = drop(cfg, suffix, data)
    outcome = ingester.ingest_file(path, root=cfg.inbox_dir)
    assert outcome.outcome == "quarantined", outcome
    assert outcome.reason == "undecodable"
    frow, drow = stored(ingester, path)
    assert frow["status"] == "quarantined" and drow["status"] == "quarantined"


@FUZZ
@given(data=st.binary(max_size=3000).map(lambda b: b"%PDF-1.7\n" + b))
def test_random_pdf_bodies_are_quarantined(env: tuple[Config, Ingester], data: bytes) -> None:
    cfg, ingester = env
    outcome = ingester.ingest_file(drop(cfg, ".pdf", data))
    assert outcome.outcome == "quarantined"
    assert outcome.reason in ("broken_pdf", "empty")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
good_line = st.builds(
    lambda t: json.dumps({"text": "a valid record with enough text " + t}), st.text(max_size=40)
)
bad_line = st.one_of(
    # Not JSON at all (a non-empty line that json.loads rejects).
    st.text(min_size=1, max_size=60).filter(
        lambda s: s.strip() and _not_json(s) and "\n" not in s and "\r" not in s
    ),
    # JSON, but not an object.
    json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    # An object of no known shape.
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("text", "messages", "prompt", "completion")),
        json_values,
        min_size=0,
        max_size=3,
    ).map(json.dumps),
    # A chat record with a bad message.
    st.builds(
        lambda r: json.dumps({"messages": [{"role": r, "content": "x"}]}), st.text(max_size=10)
    ),
)


def _not_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return True
    return False


@FUZZ
@given(
    before=st.lists(good_line, max_size=5),
    bad=bad_line,
    after=st.lists(good_line | bad_line, max_size=5),
)
def test_malformed_jsonl_is_quarantined_with_line_number(
    env: tuple[Config, Ingester], before: list[str], bad: str, after: list[str]
) -> None:
    cfg, ingester = env
    lines = [*before, bad, *after]
    path = drop(cfg, ".jsonl", ("\n".join(lines) + "\n").encode())
    outcome = ingester.ingest_file(path)
    assert outcome.outcome == "quarantined", (lines, outcome)
    assert outcome.reason == "malformed_jsonl", outcome.error
    assert outcome.error is not None
    assert outcome.error.startswith(f"malformed_jsonl: line {len(before) + 1}:")


@FUZZ
@given(
    data=st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode),
    suffix=st.sampled_from([".txt", ".md", ".html", ".htm", ".pdf", ".jsonl", ".bin", ""]),
)
def test_any_bytes_never_raise(env: tuple[Config, Ingester], data: bytes, suffix: str) -> None:
    cfg, ingester = env
    path = drop(cfg, suffix, data)
    outcome = ingester.ingest_file(path)
    assert outcome.outcome in ("ingested", "duplicate", "quarantined")
    frow, drow = stored(ingester, path)
    assert frow["document_id"] == drow["id"]
    if outcome.outcome == "quarantined":
        assert drow["status"] == "quarantined" and ":" in drow["error"]
    # The parser alone raises only its declared error type.
    try:
        parse(data, suffix)
    except Exception as exc:
        assert type(exc).__name__ == "Quarantine"
