"""SIGKILL the daemon at random moments across ingest, stage, eval and promotion (#12).

CI size: a few kills on one state dir, then a clean run; nothing may be lost, stored
twice, corrupted, promoted without passing the gate, or left running.
``benchmarks/faults.py --kills 100`` runs the same loop at full size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.kills import run_kills

pytestmark = [pytest.mark.slow]

KILLS = 3  # ingest, training, evaluation (tests/faults/kills.py TARGETS)


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, tiny_seed_model: Path) -> None:
    report = run_kills(tmp_path, tiny_seed_model, kills=KILLS, docs_per_round=3, seed=12)
    detail = "\n".join(report.problems)
    assert report.kills == KILLS, detail
    assert report.crashes == 0, detail
    assert report.documents_lost == 0, detail
    assert report.documents_duplicated == 0, detail
    assert report.integrity_failures == 0, detail
    assert report.bad_promotions == 0, detail
    assert report.orphans == 0, detail
    assert report.stages_failed_by_kills == 0, detail
    print(f"kills by phase: {dict(report.phases)} in {report.seconds:.0f} s")
