"""Disk full under the state dir: a small tmpfs the test mounts (we may be root).

Shared by ``tests/faults/test_disk_full.py`` and ``benchmarks/faults.py``. The state dir
lives on a 3 MiB tmpfs that a filler file nearly fills; ``evergreen ingest`` must then
fail with one line (no traceback) and store nothing half-way, and once the filler is
gone the same command must store every document, with the store intact. Where mounting
is refused (not root, no tmpfs), :func:`mounted` raises :class:`MountRefused` with why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults import audit
from tests.harness import ROOT, to_toml


class MountRefused(RuntimeError):
    """No tmpfs could be mounted here (the reason is the message)."""


@contextmanager
def mounted(where: Path, size: str = "3m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise MountRefused(f"mount -t tmpfs refused: {(proc.stderr or proc.stdout).strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(where: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about ``leave_bytes`` free on ``where``'s filesystem."""
    filler = where / "filler"
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


@dataclass
class DiskFullReport:
    recovered: bool = False
    full_exit: int | None = None
    full_error: str = ""
    problems: list[str] = field(default_factory=list)


def _ingest(config: Path, inbox: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(config), "ingest", "--json", str(inbox)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def run_disk_full(tmp: Path, base_model: Path, n_docs: int = 40) -> DiskFullReport:
    """Ingest into a full state dir, then again once there is room; see the module doc."""
    report = DiskFullReport()
    inbox = tmp / "inbox"
    inbox.mkdir(parents=True)
    for i in range(n_docs):
        body = f"Disk full document {i}: the keeper of shelf {i} files reports every week. "
        (inbox / f"doc-{i:03d}.txt").write_text(body * 40, encoding="utf-8")
    with mounted(tmp / "small") as small:
        state = small / "state"
        config = tmp / "evergreen.toml"
        config.write_text(
            to_toml(
                {
                    "state_dir": str(state),
                    "inbox_dir": str(inbox),
                    "base_model": str(base_model),
                    "serving": {"mode": "none"},
                }
            )
        )
        first = _ingest(config, inbox)  # creates the store; then the disk fills up
        if first.returncode != 0:
            report.problems.append(f"ingest with room failed: {first.stderr[-2000:]}")
            return report
        for i in range(n_docs, 3 * n_docs):
            body = f"Second wave document {i}, written while the disk is full of filler. "
            (inbox / f"doc-{i:03d}.txt").write_text(body * 40, encoding="utf-8")
        filler = fill(small, leave_bytes=16 * 1024)
        full = _ingest(config, inbox)
        report.full_exit = full.returncode
        report.full_error = (full.stderr or full.stdout).strip()
        if "Traceback" in full.stderr:
            report.problems.append(f"disk full gave a traceback:\n{full.stderr[-3000:]}")
        filler.unlink()
        again = _ingest(config, inbox)
        if again.returncode != 0:
            report.problems.append(f"ingest after freeing space failed: {again.stderr[-2000:]}")
        db = state / "evergreen.db"
        dropped = sorted(inbox.iterdir())
        lost = audit.documents_lost(db, dropped)
        broken = audit.integrity_failures(db)
        dup = audit.documents_duplicated(db)
        report.problems += [f"lost {p}" for p in lost[:5]] + broken
        if dup:
            report.problems.append(f"{dup} duplicated")
        report.recovered = again.returncode == 0 and not lost and not broken and not dup
    return report


def run_stage_disk_full(tmp: Path, base_model: Path) -> DiskFullReport:
    """A stage whose checkpoint and adapter save hit a full disk fails cleanly (no half
    adapter, pointer unchanged, data still pending); with room again the next stage runs."""
    from daemon import config as config_mod
    from daemon.serving import promotion
    from daemon.training import runner
    from store import adapters, documents
    from store.db import open_db
    from tests.fixtures_model import add_doc

    report = DiskFullReport()
    with mounted(tmp / "small-stage", size="24m") as small:
        cfg = config_mod.from_dict(
            {
                "state_dir": str(small / "state"),
                "base_model": str(base_model),
                "serving": {"mode": "none"},
                "training": {"min_steps": 0, "passes": 0.0, "lora_rank": 16, "epochs": 1.0},
                "policy": {"promotion": {"name": "gate", "min_new_improvement": 0.0}},
            }
        )
        cfg.state_path.mkdir(parents=True)
        db = open_db(cfg.db_path)
        facts = [f"The vault {i} keeps {i * 7} silver keys under stone {i}." for i in range(12)]
        add_doc(db, facts[:10], holdout=facts[10:])

        def promote(version: str, why: str) -> promotion.Promotion:
            return promotion.promote(cfg, version, why)

        filler = fill(small, leave_bytes=64 * 1024)
        full = runner.run_stage(cfg, db, promote=promote)
        report.full_exit = 0 if full.status != "failed" else 1
        report.full_error = full.reason
        if full.status != "failed":
            report.problems.append(f"stage on a full disk ended {full.status}: {full.reason}")
        if adapters.current(db, cfg.track) is not None:
            report.problems.append("a stage on a full disk moved the current pointer")
        if not documents.pending_chunks(db, cfg.track):
            report.problems.append("a failed stage took its data along")
        half = [p for p in cfg.adapters_dir.glob("*") if not (p / "adapter_config.json").exists()]
        report.problems += [f"half adapter left: {p}" for p in half]
        filler.unlink()
        again = runner.run_stage(cfg, db, promote=promote)
        if again.status not in ("promoted", "rejected"):
            report.problems.append(f"stage with room again: {again.status} {again.reason}")
        report.recovered = not report.problems and not audit.integrity_failures(cfg.db_path)
        db.conn.close()
    return report
