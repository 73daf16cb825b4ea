"""After faults: what the store and the machine must still look like.

Read-only checks shared by ``tests/faults/`` and ``benchmarks/faults.py``, each a count
that must be 0: documents dropped into the inbox but not stored, stored twice, SQLite
integrity, a current adapter or promoted version whose stage was not promoted (a bad
promotion), and processes or stage rows left behind by a killed daemon (orphans).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def _query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    conn = _connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def stored_paths(db: Path) -> set[str]:
    """Inbox paths whose content is in the store (ingested, or a duplicate of stored text)."""
    rows = _query(
        db,
        "SELECT f.path FROM files f JOIN documents d ON d.id = f.document_id"
        " WHERE f.status IN ('ingested', 'duplicate') AND d.status IN ('ingested', 'trained')",
    )
    return {str(r["path"]) for r in rows}


def documents_lost(db: Path, dropped: Iterable[Path]) -> list[str]:
    """Dropped files (each with its own text) that the store does not hold."""
    have = stored_paths(db)
    return sorted(str(p) for p in dropped if str(p) not in have)


def documents_duplicated(db: Path) -> int:
    """Texts stored more than once, and chunks a document holds twice."""
    docs = _query(
        db,
        "SELECT content_hash, track, COUNT(*) AS n FROM documents"
        " WHERE status IN ('ingested', 'trained') GROUP BY content_hash, track HAVING n > 1",
    )
    chunks = _query(
        db,
        "SELECT document_id, seq, split, COUNT(*) AS n FROM chunks"
        " WHERE split != 'synthetic' GROUP BY document_id, seq, split HAVING n > 1",
    )
    return sum(int(r["n"]) - 1 for r in docs) + sum(int(r["n"]) - 1 for r in chunks)


def integrity_failures(db: Path) -> list[str]:
    """``PRAGMA integrity_check`` and ``foreign_key_check`` findings (empty: sound)."""
    conn = _connect(db)
    try:
        check = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        fks = [tuple(r) for r in conn.execute("PRAGMA foreign_key_check")]
    finally:
        conn.close()
    return [c for c in check if c != "ok"] + [f"foreign key: {fk}" for fk in fks]


def bad_promotions(db: Path) -> list[str]:
    """Versions made current or marked promoted although their stage was not promoted."""
    rows = _query(
        db,
        "SELECT a.version, a.status, s.status AS stage_status,"
        " a.version IN (SELECT version FROM current_adapter WHERE version IS NOT NULL) AS cur"
        " FROM adapters a LEFT JOIN stages s ON s.id = a.stage_id"
        " WHERE a.stage_id IS NOT NULL AND (a.status = 'promoted' OR a.version IN"
        " (SELECT version FROM current_adapter WHERE version IS NOT NULL))",
    )
    return [
        f"{r['version']} ({r['status']}, current={bool(r['cur'])}) from a {r['stage_status']} stage"
        for r in rows
        if r["stage_status"] != "promoted"
    ]


def stages_failed_by_kills(db: Path) -> list[str]:
    """Stages failed for their daemon's death (a broken progress pipe), not their data:
    such a stage must stop at a checkpoint and resume under the next daemon."""
    rows = _query(
        db,
        "SELECT id, reason FROM stages WHERE status = 'failed'"
        " AND (reason LIKE '%BrokenPipe%' OR reason LIKE '%Broken pipe%')",
    )
    return [f"stage {r['id']} failed: {r['reason']}" for r in rows]


def file_rows(db: Path) -> set[str]:
    """Every path the store has a row for (stored, duplicate or quarantined), as keys."""
    try:
        return {str(r["path"]) for r in _query(db, "SELECT path FROM files")}
    except sqlite3.Error:
        return set()


def chunks_containing(db: Path, needle: str) -> list[int]:
    rows = _query(db, "SELECT id FROM chunks WHERE instr(text, ?) > 0", (needle,))
    return [int(r["id"]) for r in rows]


def current_version(db: Path, track: str = "default") -> str | None:
    rows = _query(db, "SELECT version FROM current_adapter WHERE track = ?", (track,))
    return str(rows[0]["version"]) if rows and rows[0]["version"] else None


def active_stages(db: Path) -> list[dict[str, Any]]:
    rows = _query(
        db,
        "SELECT id, status, pid FROM stages"
        " WHERE status IN ('planned', 'running', 'trained', 'evaluated')",
    )
    return [dict(r) for r in rows]


def orphan_processes(marker: str, grace_s: float = 0.0) -> list[str]:
    """Live processes whose command line names ``marker`` (a state dir): after the last
    daemon stopped cleanly there must be none (a stage, scorer or vLLM left behind), once
    ``grace_s`` has passed (a child of a killed daemon may take that long to notice)."""
    deadline = time.monotonic() + grace_s
    while True:
        found = _processes_naming(marker)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(1.0)


def _processes_naming(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if marker in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.info['pid']}: {cmd[:160]}")
        except psutil.Error:
            continue
    return found


def phase(db: Path, inbox: Path, daemon_pid: int) -> str:
    """What the daemon is doing: ``stage:<status>`` (running = training, trained =
    evaluating, evaluated = gate and promotion), ``score`` while its scorer runs, ``ingest``
    while inbox files are not all recorded, else ``idle`` (``start`` before its store)."""
    try:
        active = active_stages(db)
        if active:
            return f"stage:{active[0]['status']}"
        seen = {str(r["path"]) for r in _query(db, "SELECT path FROM files")}
    except sqlite3.Error:
        return "start"
    try:
        children = psutil.Process(daemon_pid).children()
        if any("daemon.training.score" in " ".join(c.cmdline()) for c in children):
            return "score"
    except psutil.Error:
        pass
    names = [str(p) for p in inbox.iterdir() if p.is_file()]
    return "ingest" if any(n not in seen for n in names) else "idle"
