"""The engine on a real SQLite store with a fake clock: explained decisions, change-only
decision events, downtime catch-up, planning with scores, the gate and rejected data."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from daemon import config as config_mod
from daemon.config import Config
from daemon.scheduling import decisions, planning, probes
from store import documents, events, stages
from store.db import open_db, transaction

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC).timestamp()
H = 3600.0
M = 60.0


def make_cfg(tmp_path: Path, **policy: Any) -> Config:
    return config_mod.from_dict(
        {"state_dir": str(tmp_path / "state"), "seed": {"size": "tiny"}, "policy": policy}
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite_utils.Database]:
    d = open_db(tmp_path / "state" / "evergreen.db")
    yield d
    d.conn.close()


def add_doc(
    db: sqlite_utils.Database,
    name: str,
    tokens: list[int],
    *,
    holdout: int = 1,
    created_at: float = T0 - 10 * M,
) -> tuple[int, list[int], list[int]]:
    """A document with train chunks of the given sizes plus ``holdout`` holdout chunks."""
    chunks = [documents.ChunkIn(f"{name} train {i}", n, "train") for i, n in enumerate(tokens)]
    chunks += [documents.ChunkIn(f"{name} holdout {i}", 10, "holdout") for i in range(holdout)]
    with transaction(db):
        doc = documents.insert_document(
            db, track="default", path=f"/inbox/{name}.txt", content_hash=name, size=1,
            mtime=0.0, fmt="text", chunks=chunks,
        )  # fmt: skip
        db.conn.execute("UPDATE chunks SET created_at = ? WHERE document_id = ?", (created_at, doc))
    rows = db.conn.execute(
        "SELECT id, split FROM chunks WHERE document_id = ? ORDER BY id", (doc,)
    ).fetchall()
    return doc, [r[0] for r in rows if r[1] == "train"], [r[0] for r in rows if r[1] == "holdout"]


def add_stage(db: sqlite_utils.Database, status: str, at: float, plan: Any = None) -> int:
    with transaction(db):
        sid = stages.create(db, plan or {"new_chunk_ids": []})
        if status != stages.PLANNED:
            stages.set_status(db, sid, status)
        db.conn.execute(
            "UPDATE stages SET created_at = ?, started_at = ?, finished_at = ? WHERE id = ?",
            (at, at, at if status in stages.FINAL else None, sid),
        )
    return sid


def decision_events(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    return events.recent(db, kind_prefix=decisions.EVENT_KIND, limit=100)


# ----------------------------------------------------------------------------- explain_next
def test_nothing_pending(tmp_path: Path, db: sqlite_utils.Database) -> None:
    out = decisions.explain_next(make_cfg(tmp_path), db, now=T0, tz=UTC)
    assert out["fire"] is False
    assert out["summary"].startswith("nothing pending to train (then: ")
    assert out["reasons"][0] == "nothing pending to train"


EXPLAIN_CASES: list[tuple[str, dict[str, Any], bool, str]] = [
    (
        "waiting",
        {"tokens": [300, 200], "oldest": T0 - 20 * M, "last_stage": T0 - 2 * M},
        False,
        "next stage when ≥ 2,000 new tokens (now 500) or at 12:40 (staleness 1h),"
        " cooldown ends 12:03",
    ),
    (
        "tokens",
        {"tokens": [1500, 700], "oldest": T0 - 20 * M, "last_stage": None},
        True,
        "train now: no stage yet (cooldown 5m); 2,200 new tokens pending, ≥ 2,000",
    ),
    (
        "stale",
        {"tokens": [5], "oldest": T0 - 2 * H, "last_stage": T0 - H},
        True,
        "train now: cooldown 5m over (last stage 1h ago); oldest pending data is 2h old"
        " (max staleness 1h)",
    ),
]


@pytest.mark.parametrize(
    ("setup", "fire", "summary"), [c[1:] for c in EXPLAIN_CASES], ids=[c[0] for c in EXPLAIN_CASES]
)
def test_explain_next_default_tree(
    tmp_path: Path, db: sqlite_utils.Database, setup: dict[str, Any], fire: bool, summary: str
) -> None:
    add_doc(db, "a", setup["tokens"], created_at=setup["oldest"])
    if setup["last_stage"] is not None:
        add_stage(db, stages.PROMOTED, setup["last_stage"])
    out = decisions.explain_next(make_cfg(tmp_path), db, now=T0, tz=UTC)
    assert out["fire"] is fire
    assert out["summary"] == summary
    assert out["state"]["pending_tokens"] == sum(setup["tokens"])


def test_running_stage_never_fires(tmp_path: Path, db: sqlite_utils.Database) -> None:
    add_doc(db, "a", [5000], created_at=T0 - 5 * H)
    sid = add_stage(db, stages.RUNNING, T0 - H)
    out = decisions.explain_next(make_cfg(tmp_path), db, now=T0, tz=UTC)
    assert out["fire"] is False
    assert out["reasons"][0] == f"stage #{sid} is running; at most one stage at a time"
    assert out["state"]["stage_running"] is True


def test_decision_events_only_on_change(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(tmp_path)
    add_doc(db, "a", [100], created_at=T0)
    for i in range(5):  # five ticks, token count changes, verdicts do not
        add_doc(db, f"more{i}", [10], created_at=T0)
        out = decisions.explain_next(cfg, db, now=T0 + i * 30, tz=UTC)
        assert out["fire"] is False
    evs = decision_events(db)
    assert len(evs) == 1
    assert evs[0]["message"].startswith("next stage when ≥ 2,000 new tokens (now 110)")
    add_doc(db, "big", [5000], created_at=T0)  # now min_new_tokens fires: a real change
    decisions.explain_next(cfg, db, now=T0 + 300, tz=UTC)
    evs = decision_events(db)
    assert len(evs) == 2
    assert evs[0]["message"].startswith("train now: ")
    assert evs[0]["data"]["fire"] is True


def test_status_look_does_not_write(tmp_path: Path, db: sqlite_utils.Database) -> None:
    add_doc(db, "a", [100])
    decisions.explain_next(make_cfg(tmp_path), db, now=T0, tz=UTC, record=False)
    assert decision_events(db) == []
    assert db.conn.execute("SELECT COUNT(*) FROM kv WHERE key LIKE 'policy.%'").fetchone()[0] == 0


def test_missed_window_runs_once_after_downtime(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(
        tmp_path,
        trigger={
            "all": [
                {"name": "window", "cron": "0 2 * * *", "duration": "1h", "timezone": "UTC"},
                {"name": "min_new_tokens", "n": 10},
            ]
        },
    )
    add_doc(db, "a", [100], created_at=T0 - 3 * 86400)
    before = T0 - 2 * 86400  # the daemon last ticked two days ago, then went down
    assert decisions.explain_next(cfg, db, now=before, tz=UTC)["fire"] is False
    first = decisions.explain_next(cfg, db, now=T0, tz=UTC)
    assert first["fire"] is True
    assert "missed the maintenance window of Sat 21 Nov 02:00 while down" in first["summary"]
    # still true on the next tick until a stage starts...
    assert decisions.explain_next(cfg, db, now=T0 + 30, tz=UTC)["fire"] is True
    add_stage(db, stages.RUNNING, T0 + 40)
    assert decisions.explain_next(cfg, db, now=T0 + 60, tz=UTC)["fire"] is False
    with transaction(db):
        db.conn.execute("UPDATE stages SET status = 'promoted', finished_at = ?", (T0 + 90,))
    # ...and once one ran, the missed windows (two of them) do not fire again
    after = decisions.explain_next(cfg, db, now=T0 + 120, tz=UTC)
    assert after["fire"] is False
    assert "in the maintenance window (tomorrow at 02:00)" in after["summary"]


def test_surprise_reads_chunk_scores(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(tmp_path, trigger={"name": "surprise", "ratio": 2.0})
    _, learned_train, learned_holdout = add_doc(db, "old", [50], holdout=2)
    with transaction(db):
        documents.mark_trained(db, learned_train, stage_id=1)
    _, new_train, _ = add_doc(db, "new", [40, 60])
    out = decisions.explain_next(cfg, db, now=T0, tz=UTC)
    assert out["fire"] is False
    assert out["reasons"] == ["surprise: learned holdout not scored yet, waiting for the scorer"]
    with transaction(db):
        documents.put_scores(db, None, {learned_holdout[0]: 1.0, learned_holdout[1]: 1.0})
        documents.put_scores(db, None, {new_train[0]: 2.0, new_train[1]: 2.0})
    out = decisions.explain_next(cfg, db, now=T0, tz=UTC)
    assert out["fire"] is True  # exp(2 - 1) = 2.72x >= 2
    assert "perplexity 7.4 is 2.72× learned holdout 2.7 (≥ 2×)" in out["reasons"][0]
    assert out["state"]["pending_scored_fraction"] == 1.0


def test_serving_and_memory_probes_are_injected(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(
        tmp_path,
        trigger={
            "all": [
                {"name": "serving_load", "max_running": 1},
                {"name": "resources", "min_free_memory": "1GiB"},
            ]
        },
    )
    add_doc(db, "a", [10])
    seen: list[list[str]] = []

    def fetch(endpoints: list[str]) -> dict[str, float | None]:
        seen.append(endpoints)
        return dict.fromkeys(endpoints, 3.0)

    out = decisions.explain_next(
        cfg, db, now=T0, tz=UTC, fetch_serving=fetch, probe_memory=lambda: 2 * 1024**3
    )
    assert seen == [["http://127.0.0.1:8000"]]
    assert out["fire"] is False
    assert "serving busy: http://127.0.0.1:8000 has 3 running requests (max 1)" in out["reasons"]
    assert "free memory 2.0 GiB ≥ 1.0 GiB" in out["reasons"]


METRICS_TEXT = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="evergreen"} 2.0
vllm:num_requests_running{engine="0",model_name="evergreen-v0002"} 1.0
"""


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = METRICS_TEXT if self.path == "/metrics" else b"no"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_fetch_running_over_loopback() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        closed = "http://127.0.0.1:9"  # discard port: nothing listens
        loads = probes.fetch_running([url, closed], timeout=2.0)
    finally:
        server.shutdown()
        server.server_close()
    assert loads == {url: 3.0, closed: None}


# ----------------------------------------------------------------------------- plan_stage
def test_plan_stage_selection_replay_and_holdout(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(
        tmp_path,
        selection={"name": "highest_loss", "token_budget": 200},
        replay={"name": "most_forgotten", "ratio": 0.5},
    )
    # learned data in the replay buffer, with losses at learning time and now
    _, old, _ = add_doc(db, "old", [25, 25, 25, 25], holdout=0)
    with transaction(db):
        documents.mark_trained(db, old, stage_id=1, losses=dict.fromkeys(old, 1.0))
        documents.replay_add(db, "default", old, capacity=100, stage_id=1)
        documents.put_scores(db, None, {old[0]: 1.1, old[1]: 2.0, old[2]: 1.5, old[3]: 0.9})
    _, a_train, a_hold = add_doc(db, "a", [100, 100], holdout=1)
    _, b_train, b_hold = add_doc(db, "b", [100], holdout=1)
    with transaction(db):
        documents.put_scores(db, None, {a_train[0]: 1.0, a_train[1]: 4.0, b_train[0]: 3.0})
    plan = planning.plan_stage(cfg, db)
    assert plan is not None
    assert plan["new_chunk_ids"] == [a_train[1], b_train[0]]  # losses 4.0 and 3.0
    assert plan["new_tokens"] == 200
    assert plan["replay_budget_tokens"] == 100
    assert plan["replay_chunk_ids"] == [old[1], old[2], old[0], old[3]]  # +1.0, +0.5, +0.1, -0.1
    assert sorted(plan["holdout_chunk_ids"]) == sorted(a_hold + b_hold)
    assert plan["parent_version"] is None
    assert any("1 chunks wait for the next stage" in r for r in plan["reasons"])
    assert any(r.startswith("most_forgotten replay: 4 of 4") for r in plan["reasons"])


def test_plan_stage_nothing_pending(tmp_path: Path, db: sqlite_utils.Database) -> None:
    assert planning.plan_stage(make_cfg(tmp_path), db) is None


# ----------------------------------------------------------------------------- after_reject
REJECT_CASES = [
    # on_reject, max_retries, rejections, still pending afterwards?, message
    ("retry", 2, 1, True, "2 new chunks stay pending for retry, 0 set aside"),
    ("retry", 2, 3, False, "0 new chunks stay pending for retry, 2 set aside (after more"),
    ("drop", 2, 1, False, "set aside (policy.on_reject = drop)"),
]


@pytest.mark.parametrize("case", REJECT_CASES, ids=["retry-once", "retry-exhausted", "drop"])
def test_after_reject(
    tmp_path: Path, db: sqlite_utils.Database, case: tuple[str, int, int, bool, str]
) -> None:
    on_reject, max_retries, rejections, pending_after, message = case
    cfg = make_cfg(tmp_path, on_reject=on_reject, max_retries=max_retries)
    _, train, _ = add_doc(db, "a", [100, 100])
    result: dict[str, Any] = {}
    for _ in range(rejections):
        sid = add_stage(db, stages.REJECTED, T0, plan={"new_chunk_ids": train})
        result = planning.after_reject(cfg, db, sid)
    statuses = {r[0] for r in db.conn.execute("SELECT status FROM chunks WHERE split = 'train'")}
    assert statuses == ({documents.PENDING} if pending_after else {documents.DROPPED})
    assert message in result["message"]
    attempts = {r[0] for r in db.conn.execute("SELECT attempts FROM chunks WHERE split='train'")}
    assert attempts == {rejections}
    assert (
        events.recent(db, kind_prefix=planning.REJECT_EVENT_KIND)[0]["message"] == result["message"]
    )
    # nothing is ever deleted
    assert db.conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 3


def test_scoring_needs_follow_the_configured_policies(
    tmp_path: Path, db: sqlite_utils.Database
) -> None:
    _, old, old_hold = add_doc(db, "old", [10, 10], holdout=1)
    with transaction(db):
        documents.mark_trained(db, old, stage_id=1)
        documents.replay_add(db, "default", old, capacity=10, stage_id=1)
    _, new, _ = add_doc(db, "new", [10, 10], holdout=0)
    with transaction(db):
        documents.put_scores(db, None, {new[0]: 1.0})

    fifo_uniform = make_cfg(tmp_path, selection={"name": "fifo"})
    assert planning.scoring_needs(fifo_uniform, db)["chunk_ids"] == []

    everything = make_cfg(
        tmp_path,
        trigger={"name": "surprise", "ratio": 1.5},
        replay={"name": "most_forgotten"},
    )
    needs = planning.scoring_needs(everything, db)
    assert needs["adapter_version"] == ""
    assert needs["chunk_ids"] == [new[1], *old_hold, *old]
    assert needs["reasons"] == [
        "pending: 1 of 2 chunks unscored",
        "learned holdout: 1 of 1 chunks unscored",
        "replay: 2 of 2 chunks unscored",
    ]


def test_after_reject_inside_callers_transaction(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(tmp_path)
    _, train, _ = add_doc(db, "a", [100])
    sid = add_stage(db, stages.REJECTED, T0, plan={"new_chunk_ids": train})
    with transaction(db):  # the runner marks the stage and handles its data atomically
        result = planning.after_reject(cfg, db, sid)
    assert result["retry"] == train


def test_window_summary_names_the_time_once(tmp_path: Path, db: sqlite_utils.Database) -> None:
    cfg = make_cfg(
        tmp_path,
        trigger={"name": "window", "cron": "0 2 * * *", "duration": "3h", "timezone": "UTC"},
    )
    add_doc(db, "a", [700])
    out = decisions.explain_next(cfg, db, now=T0, tz=UTC)
    assert out["summary"] == "next stage when in the maintenance window (tomorrow at 02:00)"
    assert out["due_at"] == T0 + 14 * H


def test_policies_never_import_torch() -> None:
    """The daemon imports policies every tick; torch would cost it hundreds of MB of RSS."""
    import subprocess
    import sys

    code = (
        "import sys, daemon.scheduling.decisions, daemon.scheduling.planning,"
        " daemon.scheduling.schedule, daemon.scheduling.probes, daemon.status;"
        "from policies.base import names;"
        "[names(k) for k in ('trigger', 'replay', 'promotion', 'selection')];"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
