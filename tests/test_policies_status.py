"""`evergreen status` shows the explained next decision; `--json` gives the same."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from daemon import config as config_mod
from daemon.cli import main
from daemon.status import collect, render
from store import documents, events
from store.db import open_db, transaction

# A fake clock: 12:00 UTC, and a data point 10 minutes older than "now".
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC).timestamp()


def _seed_store(state: Path, created_at: float | None = None) -> None:
    """One pending document of 1,234 tokens; ``created_at`` pins its chunks' time."""
    db = open_db(state / "evergreen.db")
    try:
        with transaction(db):
            doc = documents.insert_document(
                db, track="default", path="/inbox/a.txt", content_hash="a", size=1, mtime=0.0,
                fmt="text", chunks=[documents.ChunkIn("some text", 1234, "train")],
            )  # fmt: skip
            if created_at is not None:
                db.conn.execute(
                    "UPDATE chunks SET created_at = ? WHERE document_id = ?", (created_at, doc)
                )
    finally:
        db.conn.close()


@pytest.fixture
def utc_zone() -> Iterator[None]:
    """Local time is UTC: clock times in the summary read as local time of the daemon."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_status_shows_the_explained_decision(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _seed_store(state)
    runner = CliRunner()
    as_json = runner.invoke(main, ["--state-dir", str(state), "status", "--json"])
    assert as_json.exit_code == 0, as_json.output
    nd = json.loads(as_json.output)["next_decision"]
    assert nd["fire"] is False
    # The CLI reads the real clock: when the staleness limit falls ("at 14:05", "tomorrow
    # at 00:27", ...) depends on the time of day, so the exact text is checked below.
    assert nd["summary"].startswith("next stage when ≥ 2,000 new tokens (now 1,234) or ")
    assert nd["summary"].endswith("(staleness 1h)")
    assert [c["policy"] for c in nd["checks"]] == ["cooldown", "min_new_tokens", "max_staleness"]
    assert nd["state"]["pending_tokens"] == 1234

    out = io.StringIO()
    render(collect(config_mod.load(None, overrides={"state_dir": str(state)})),
           Console(file=out, width=200, color_system=None))  # fmt: skip
    text = out.getvalue()
    assert "next stage when ≥ 2,000 new tokens (now 1,234) or " in text
    assert "✗ min_new_tokens: waiting for ≥ 2,000 new tokens (now 1,234)" in text
    assert "✓ cooldown: no stage yet (cooldown 5m)" in text

    # looking is read-only: no decision event, no tick recorded
    db = open_db(state / "evergreen.db")
    try:
        assert events.recent(db, kind_prefix="policy.") == []
    finally:
        db.conn.close()


@pytest.mark.usefixtures("utc_zone")
@pytest.mark.parametrize(
    ("now", "due"),
    [
        (T0, "at 12:50"),  # data 10 min old, staleness 1h: due later today
        (T0 + 11 * 3600 + 27 * 60, "tomorrow at 00:17"),  # at 23:27 it falls after midnight
    ],
)
def test_status_says_when_the_staleness_limit_falls(tmp_path: Path, now: float, due: str) -> None:
    """With a fake clock (``now``, the data's time, the zone) the summary is exact."""
    state = tmp_path / "state"
    _seed_store(state, created_at=now - 10 * 60)
    cfg = config_mod.load(None, overrides={"state_dir": str(state)})
    data = collect(cfg, now=now)
    assert data["next_decision"]["summary"] == (
        f"next stage when ≥ 2,000 new tokens (now 1,234) or {due} (staleness 1h)"
    )
    out = io.StringIO()
    render(data, Console(file=out, width=200, color_system=None))
    assert (
        f"next stage when ≥ 2,000 new tokens (now 1,234) or {due} (staleness 1h)" in out.getvalue()
    )
