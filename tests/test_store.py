"""The SQLite store: WAL, busy timeout, ordered migrations, upgrades, reservoir sampling."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlite_utils

from store import documents, events, kv
from store.db import BUSY_TIMEOUT_MS, MIGRATIONS, migrate, open_db, transaction
from store.documents import ChunkIn


def test_wal_mode_busy_timeout_and_foreign_keys(fresh_db: sqlite_utils.Database) -> None:
    conn = fresh_db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == BUSY_TIMEOUT_MS
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migrations_are_recorded_in_order(fresh_db: sqlite_utils.Database) -> None:
    names = [r[0] for r in fresh_db.conn.execute("SELECT name FROM migrations ORDER BY rowid")]
    assert names == [name for name, _ in MIGRATIONS]
    assert names == sorted(names)
    assert migrate(fresh_db.conn) == []  # idempotent: nothing applied twice
    tables = set(fresh_db.table_names())
    for table in ("documents", "files", "chunks", "replay_buffer", "stages", "adapters", "events"):
        assert table in tables
        assert "track" in fresh_db[table].columns_dict


def test_opening_an_older_database_upgrades_it_and_keeps_rows(db_path: Path) -> None:
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    assert migrate(conn, MIGRATIONS[:1]) == [MIGRATIONS[0][0]]
    now = time.time()
    conn.execute(
        "INSERT INTO documents (track, path, content_hash, size, mtime, format, status,"
        " created_at, updated_at) VALUES ('default', '/x.txt', 'h1', 3, 1.0, 'txt',"
        " 'ingested', ?, ?)",
        (now, now),
    )
    conn.execute(
        "INSERT INTO chunks (track, document_id, seq, text, n_tokens, split, created_at)"
        " VALUES ('default', 1, 0, 'old chunk', 2, 'train', ?)",
        (now,),
    )
    conn.close()

    db = open_db(db_path)
    try:
        names = [r[0] for r in db.conn.execute("SELECT name FROM migrations ORDER BY rowid")]
        assert names == [name for name, _ in MIGRATIONS]
        assert "chunk_scores" in db.table_names()
        assert [r["text"] for r in db.query("SELECT text FROM chunks")] == ["old chunk"]
        assert db.conn.execute("SELECT path FROM documents").fetchone()[0] == "/x.txt"
        documents.put_scores(db, None, {1: 2.5})  # the new table works with the old rows
        assert documents.scores(db, None, [1]) == {1: 2.5}
    finally:
        db.conn.close()


def test_a_failing_migration_is_rolled_back_and_not_recorded(db_path: Path) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("boom")

    conn = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        with pytest.raises(RuntimeError):
            migrate(conn, [*MIGRATIONS, ("999_broken", broken)])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "half_done" not in tables
        recorded = {r[0] for r in conn.execute("SELECT name FROM migrations")}
        assert recorded == {name for name, _ in MIGRATIONS}
    finally:
        conn.close()


def test_a_second_writer_waits_instead_of_failing(db_path: Path) -> None:
    first, second = open_db(db_path), open_db(db_path)
    holding = threading.Event()

    def hold_lock() -> None:
        with transaction(first):
            kv.put(first, "k", "first")
            holding.set()
            time.sleep(0.5)

    t = threading.Thread(target=hold_lock)
    t.start()
    holding.wait()
    try:
        with transaction(second):  # blocks on the busy timeout, then succeeds
            kv.put(second, "k", "second")
    finally:
        t.join()
    try:
        assert kv.get(first, "k") == "second"
    finally:
        first.conn.close()
        second.conn.close()


def test_opening_the_store_while_another_connection_writes_never_fails(tmp_path: Path) -> None:
    # Regression: SQLite answers a journal-mode PRAGMA that races a writer on the same new
    # file with SQLITE_BUSY and no busy-handler retry; the inbox worker died of it.
    errors: list[BaseException] = []
    for round_ in range(20):
        path = tmp_path / f"race{round_}.db"
        stop = threading.Event()

        def writer(path: Path = path, stop: threading.Event = stop) -> None:
            try:
                db = open_db(path)
                while not stop.is_set():
                    with transaction(db):
                        db.conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
                        db.conn.execute("INSERT INTO t VALUES (1)")
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        def opener(path: Path = path) -> None:
            try:
                for _ in range(20):
                    open_db(path).conn.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer)] + [
            threading.Thread(target=opener) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        stop.set()
        threads[0].join()
        assert errors == [], f"round {round_}: {errors!r}"


def test_transaction_rolls_back_on_error(fresh_db: sqlite_utils.Database) -> None:
    with pytest.raises(ValueError), transaction(fresh_db):
        events.record(fresh_db, "test.event", "will vanish")
        raise ValueError("nope")
    assert events.recent(fresh_db) == []


def _doc_with_chunks(db: sqlite_utils.Database, n: int, tag: str = "") -> list[int]:
    doc = documents.insert_document(
        db,
        track="default",
        path=f"/doc{tag}",
        content_hash=f"hash{tag}",
        size=1,
        mtime=1.0,
        fmt="txt",
        chunks=[ChunkIn(f"chunk {i}", 2, "train") for i in range(n)],
    )
    return [r[0] for r in db.conn.execute("SELECT id FROM chunks WHERE document_id = ?", (doc,))]


def test_replay_reservoir_stays_bounded_and_roughly_uniform(
    fresh_db: sqlite_utils.Database,
) -> None:
    n, capacity, stages, trials = 1000, 100, 10, 60
    with transaction(fresh_db):
        ids = _doc_with_chunks(fresh_db, n)
    per_stage = n // stages
    stage_of = {cid: i // per_stage for i, cid in enumerate(ids)}
    counts: Counter[int] = Counter()
    rng = random.Random(1234)
    with transaction(fresh_db):
        for trial in range(trials):
            track = f"t{trial}"
            for s in range(stages):
                documents.replay_add(
                    fresh_db,
                    track,
                    ids[s * per_stage : (s + 1) * per_stage],
                    capacity=capacity,
                    stage_id=s,
                    rng=rng,
                )
                size = fresh_db.conn.execute(
                    "SELECT COUNT(*) FROM replay_buffer WHERE track = ?", (track,)
                ).fetchone()[0]
                assert size == min(capacity, (s + 1) * per_stage)
            kept = [
                r[0]
                for r in fresh_db.conn.execute(
                    "SELECT chunk_id FROM replay_buffer WHERE track = ?", (track,)
                )
            ]
            assert len(set(kept)) == len(kept) == capacity
            counts.update(stage_of[c] for c in kept)
            assert kv.get(fresh_db, f"replay_seen:{track}") == str(n)
    # Each chunk is kept with probability capacity / n, whichever stage offered it: every
    # stage expects trials * per_stage * capacity / n = 600 kept chunks (sd ~ 23).
    expected = trials * per_stage * capacity / n
    for stage in range(stages):
        assert abs(counts[stage] - expected) < 0.2 * expected, counts


def test_replay_seen_counter_survives_reopen(db_path: Path) -> None:
    db = open_db(db_path)
    with transaction(db):
        ids = _doc_with_chunks(db, 30)
        documents.replay_add(db, "default", ids[:20], capacity=10, rng=random.Random(0))
    db.conn.close()
    db = open_db(db_path)
    try:
        with transaction(db):
            documents.replay_add(db, "default", ids[20:], capacity=10, rng=random.Random(0))
        assert kv.get(db, "replay_seen:default") == "30"
        assert len(documents.replay_rows(db, "default")) == 10
    finally:
        db.conn.close()


def test_status_counts_and_pending_tokens(fresh_db: sqlite_utils.Database) -> None:
    with transaction(fresh_db):
        _doc_with_chunks(fresh_db, 4, tag="a")
        b = documents.insert_document(
            fresh_db,
            track="default",
            path="/bad",
            content_hash="q",
            size=1,
            mtime=1.0,
            fmt="txt",
            status=documents.QUARANTINED,
            error="garbage: 90% control characters",
        )
    assert documents.status_counts(fresh_db, "default")["ingested"] == 1
    assert documents.quarantine_counts(fresh_db, "default") == {"garbage": 1}
    assert documents.pending_tokens(fresh_db, "default") == 8
    with transaction(fresh_db):
        documents.supersede_document(fresh_db, b)  # quarantined stays quarantined
    assert documents.status_counts(fresh_db, "default")["quarantined"] == 1
