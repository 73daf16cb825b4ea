"""Hostile files in the inbox of a running daemon (#12): no crash, nothing from outside
the inbox stored, every file stored or quarantined with a reason.

CI size; ``benchmarks/faults.py --bad-files 1000`` runs the same at full size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.badfiles import run_bad_files

pytestmark = [pytest.mark.slow]

N = 120


def test_hostile_files_never_crash_or_leak(tmp_path: Path, tiny_seed_model: Path) -> None:
    report = run_bad_files(tmp_path, tiny_seed_model, N, seed=12)
    detail = "\n".join(report.problems)[-8000:]
    assert report.bad_files == N
    assert len(report.kinds) >= 10, report.kinds  # hypothesis drew most kinds
    assert report.crashes == 0, detail
    assert report.outside_files_ingested == 0, detail
    assert report.unaccounted == 0, detail
    print(f"{N} hostile files ({report.kinds}) in {report.seconds:.0f} s")
