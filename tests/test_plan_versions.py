"""Adapter versions are reserved by the transaction that plans a stage: never handed out twice."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.training import plan as plan_mod
from store import adapters, stages
from store.db import open_db
from store.schema import MIGRATIONS, migrate
from tests.fixtures_model import add_doc, make_tiny_cfg


def _cfg(tmp_path: Path) -> Config:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    return make_tiny_cfg(tmp_path / "state", base)


def test_a_planned_stage_reserves_its_version(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with open_db(cfg.db_path) as db:
        add_doc(db, ["alpha beta gamma", "delta epsilon"], holdout=["zeta eta"])
        sid = plan_mod.write_plan(cfg, db)
        assert sid is not None
        assert stages.get(db, sid)["output_version"] == "v0001"  # type: ignore[index]
        # no adapter registered yet, and still the next planner gets the next version
        assert adapters.next_version(db) == "v0002"
        stages.set_status(db, sid, stages.FAILED, reason="test")
        assert adapters.next_version(db) == "v0002"  # a failed stage's version is not reused
        with pytest.raises(sqlite3.IntegrityError):
            stages.create(db, {}, output_version="v0001")


def test_concurrent_planners_get_distinct_versions(tmp_path: Path) -> None:
    """Threads, each with its own connection, plan at once: every stage a distinct version."""
    cfg = _cfg(tmp_path)
    with open_db(cfg.db_path) as db:
        add_doc(db, [f"document number {i} says something" for i in range(4)])
    n = 6
    barrier = threading.Barrier(n)
    results: list[tuple[int | None, str | None]] = []
    errors: list[BaseException] = []

    def planner() -> None:
        try:
            with open_db(cfg.db_path) as conn:
                barrier.wait(timeout=30)
                sid = plan_mod.write_plan(cfg, conn)
                row = stages.get(conn, sid) if sid is not None else None
                results.append((sid, row["plan"]["output_version"] if row else None))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=planner) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == n and all(sid is not None for sid, _ in results)
    versions = sorted(v for _, v in results if v)
    assert versions == [f"v{i:04d}" for i in range(1, n + 1)], versions


def test_migration_keeps_the_newest_stage_of_a_reused_version(tmp_path: Path) -> None:
    """An old store reused a failed stage's version; the unique column still migrates."""
    conn = sqlite3.connect(str(tmp_path / "old.db"), isolation_level=None)
    migrate(conn, [m for m in MIGRATIONS if m[0] < "006"])
    for plan in ('{"output_version": "v0001"}', '{"output_version": "v0001"}', "{}"):
        conn.execute(
            "INSERT INTO stages (track, status, plan, created_at) VALUES ('default','failed',?,0)",
            (plan,),
        )
    migrate(conn)
    rows = conn.execute("SELECT id, output_version FROM stages ORDER BY id").fetchall()
    assert rows == [(1, None), (2, "v0001"), (3, None)]
    conn.close()
