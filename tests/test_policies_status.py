"""`evergreen status` shows the explained next decision; `--json` gives the same."""

from __future__ import annotations

import io
import json
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from daemon import config as config_mod
from daemon.cli import main
from daemon.status import collect, render
from store import documents, events
from store.db import open_db, transaction


def _seed_store(state: Path) -> None:
    db = open_db(state / "evergreen.db")
    try:
        with transaction(db):
            documents.insert_document(
                db, track="default", path="/inbox/a.txt", content_hash="a", size=1, mtime=0.0,
                fmt="text", chunks=[documents.ChunkIn("some text", 1234, "train")],
            )  # fmt: skip
    finally:
        db.conn.close()


def test_status_shows_the_explained_decision(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _seed_store(state)
    runner = CliRunner()
    as_json = runner.invoke(main, ["--state-dir", str(state), "status", "--json"])
    assert as_json.exit_code == 0, as_json.output
    nd = json.loads(as_json.output)["next_decision"]
    assert nd["fire"] is False
    assert nd["summary"].startswith("next stage when ≥ 2,000 new tokens (now 1,234) or at ")
    assert nd["summary"].endswith("(staleness 1h)")
    assert [c["policy"] for c in nd["checks"]] == ["cooldown", "min_new_tokens", "max_staleness"]
    assert nd["state"]["pending_tokens"] == 1234

    out = io.StringIO()
    render(collect(config_mod.load(None, overrides={"state_dir": str(state)})),
           Console(file=out, width=200, color_system=None))  # fmt: skip
    text = out.getvalue()
    assert "next stage when ≥ 2,000 new tokens (now 1,234) or at" in text
    assert "✗ min_new_tokens: waiting for ≥ 2,000 new tokens (now 1,234)" in text
    assert "✓ cooldown: no stage yet (cooldown 5m)" in text

    # looking is read-only: no decision event, no tick recorded
    db = open_db(state / "evergreen.db")
    try:
        assert events.recent(db, kind_prefix="policy.") == []
    finally:
        db.conn.close()
