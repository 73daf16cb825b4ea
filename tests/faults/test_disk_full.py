"""Disk full (#12) on a small tmpfs the test mounts: during ingest, one line and nothing
half-stored, then everything once there is room; during a stage's checkpoint and adapter
save, a clean failure (no half adapter, pointer and data unchanged), then a normal stage.
Skipped with the reason where mounting a tmpfs is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.diskfull import MountRefused, run_disk_full, run_stage_disk_full

pytestmark = [pytest.mark.slow]


def test_ingest_on_a_full_disk_fails_in_one_line_then_recovers(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    try:
        report = run_disk_full(tmp_path, tiny_seed_model)
    except MountRefused as exc:
        pytest.skip(str(exc))
    assert report.full_exit == 1, report
    assert report.full_error.startswith("error: disk full"), report.full_error
    assert "\n" not in report.full_error
    assert report.recovered, report.problems


def test_stage_on_a_full_disk_fails_cleanly_then_recovers(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    try:
        report = run_stage_disk_full(tmp_path, tiny_seed_model)
    except MountRefused as exc:
        pytest.skip(str(exc))
    assert report.full_exit == 1, report
    assert "space" in report.full_error, report.full_error
    assert report.recovered, report.problems
