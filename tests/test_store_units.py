"""Store helpers: savepoints, open_db as a context manager, the files table, plan rows."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from store import documents, events, files, stages
from store.db import open_db, savepoint, transaction
from store.documents import ChunkIn


def _kinds(db: sqlite_utils.Database) -> list[str]:
    return [r[0] for r in db.conn.execute("SELECT kind FROM events ORDER BY id")]


def test_open_db_as_context_manager_closes_and_plain_call_stays_open(db_path: Path) -> None:
    with open_db(db_path) as db:
        events.record(db, "test.kept", "autocommit write")
    with pytest.raises(sqlite3.ProgrammingError):
        db.conn.execute("SELECT 1")  # closed on exit
    plain = open_db(db_path)
    try:
        assert _kinds(plain) == ["test.kept"]
    finally:
        plain.close()


def test_open_db_sets_the_page_cache(db_path: Path) -> None:
    with open_db(db_path, cache_mib=8) as db:
        assert db.conn.execute("PRAGMA cache_size").fetchone()[0] == -8 * 1024


def test_savepoint_outside_a_transaction_is_one(fresh_db: sqlite_utils.Database) -> None:
    with savepoint(fresh_db):
        assert fresh_db.conn.in_transaction
        events.record(fresh_db, "test.committed", "kept")
    assert not fresh_db.conn.in_transaction
    with pytest.raises(ValueError), savepoint(fresh_db):
        events.record(fresh_db, "test.undone", "rolled back")
        raise ValueError("boom")
    assert not fresh_db.conn.in_transaction
    assert _kinds(fresh_db) == ["test.committed"]


def test_nested_savepoints_undo_only_the_failing_step(fresh_db: sqlite_utils.Database) -> None:
    with transaction(fresh_db):
        events.record(fresh_db, "test.outer", "kept")
        with savepoint(fresh_db, "step"):
            events.record(fresh_db, "test.inner_ok", "kept")
            with pytest.raises(KeyError), savepoint(fresh_db, "step"):  # same name nested
                events.record(fresh_db, "test.inner_bad", "undone")
                raise KeyError("inner")
            events.record(fresh_db, "test.after", "kept")
        assert fresh_db.conn.in_transaction  # the caller's transaction is still open
    assert _kinds(fresh_db) == ["test.outer", "test.inner_ok", "test.after"]


def test_savepoint_error_keeps_the_original_exception_when_sqlite_ended_the_transaction(
    fresh_db: sqlite_utils.Database,
) -> None:
    """An error that already ended the transaction must surface, not 'no such savepoint'."""
    with (
        pytest.raises(RuntimeError, match="original"),
        transaction(fresh_db),
        savepoint(fresh_db),
    ):
        events.record(fresh_db, "test.lost", "rolled back with the transaction")
        fresh_db.conn.execute("ROLLBACK")  # what SQLITE_FULL does behind our back
        raise RuntimeError("original")
    assert _kinds(fresh_db) == []


def test_savepoint_refuses_a_name_that_is_not_an_identifier(
    fresh_db: sqlite_utils.Database,
) -> None:
    with pytest.raises(ValueError), savepoint(fresh_db, 'x"; DROP TABLE files; --'):
        pass
    assert "files" in fresh_db.table_names()


def _file(db: sqlite_utils.Database, path: str, status: str = files.INGESTED) -> None:
    files.upsert_file(
        db,
        path,
        track="default",
        size=len(path),
        mtime=1.5,
        content_hash=None,
        document_id=None,
        status=status,
    )


def test_live_stats_under_is_the_subtree_without_gone_paths(
    fresh_db: sqlite_utils.Database,
) -> None:
    with transaction(fresh_db):
        for path in ("/in/a.txt", "/in/sub/b.txt", "/in2/c.txt", "/i/d.txt", "/in.txt"):
            _file(fresh_db, path)
        _file(fresh_db, "/in/gone.txt", files.GONE)
    got = files.live_stats_under(fresh_db, "/in", "default")
    assert got == {"/in/a.txt": (9, 1.5), "/in/sub/b.txt": (13, 1.5)}
    assert files.live_stats_under(fresh_db, "/in/", "other-track") == {}


def test_rename_and_gone_keep_history_under_the_new_path(fresh_db: sqlite_utils.Database) -> None:
    with transaction(fresh_db):
        _file(fresh_db, "/in/old.txt")
        _file(fresh_db, "/in/taken.txt")
        assert files.rename_file(fresh_db, "/in/old.txt", "/in/new.txt")
        assert not files.rename_file(fresh_db, "/in/new.txt", "/in/taken.txt")  # live target
        assert files.mark_files_gone(fresh_db, ["/in/taken.txt", "/in/taken.txt"]) == 1
    assert files.file_row(fresh_db, "/in/old.txt") is None
    new = files.file_row(fresh_db, "/in/new.txt")
    assert new is not None and new["status"] == files.INGESTED
    assert files.count_with_status(fresh_db, "default", files.GONE) == 1


def test_document_lookups_and_chunk_hash(fresh_db: sqlite_utils.Database) -> None:
    with transaction(fresh_db):
        doc = documents.insert_document(
            fresh_db,
            track="default",
            path="/in/a.txt",
            content_hash="h",
            size=1,
            mtime=1.0,
            fmt="txt",
            chunks=[ChunkIn(f"chunk {i}", 2, "train") for i in range(3)],
        )
    assert documents.document_by_hash(fresh_db, "default", "h") == {
        "id": doc,
        "status": documents.INGESTED,
        "error": None,
    }
    assert documents.document_by_hash(fresh_db, "other", "h") is None
    assert documents.document_status(fresh_db, doc) == documents.INGESTED
    assert documents.document_status(fresh_db, doc + 1) is None
    ids = [int(r["id"]) for r in documents.pending_chunk_facts(fresh_db, "default")]
    order = [ids[2], 10_000, ids[0]]  # caller's order; a missing id is skipped
    expected = hashlib.sha256(
        b"".join(f"{i}\x1ftext\x1fchunk {ids.index(i)}\x1e".encode() for i in (ids[2], ids[0]))
    ).hexdigest()
    assert documents.chunks_sha256(fresh_db, order) == expected
    assert documents.chunks_sha256(fresh_db, []) == hashlib.sha256().hexdigest()


def test_set_plan_replaces_the_plan(fresh_db: sqlite_utils.Database) -> None:
    with transaction(fresh_db):
        stage_id = stages.create(fresh_db, {"new_chunk_ids": [1]})
        stages.set_plan(fresh_db, stage_id, {"new_chunk_ids": [1], "stage_dir": "/s/1"})
    row = stages.get(fresh_db, stage_id)
    assert row is not None and row["plan"] == {"new_chunk_ids": [1], "stage_dir": "/s/1"}
    stages.set_plan(fresh_db, stage_id, '{"schema_version": 1}')  # JSON from a contract
    row = stages.get(fresh_db, stage_id)
    assert row is not None and row["plan"] == {"schema_version": 1}
