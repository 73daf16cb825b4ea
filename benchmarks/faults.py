"""Faults at full size (issue #12): kills, hostile files, disk full, memory, a dead engine.

Runs the fault suite's helpers (``tests/faults/``) at the issue's sizes:

* ``--kills 100``: SIGKILL ``evergreen run`` at moments chosen in turn during ingest,
  training, evaluation, the gate and promotion, and at random; restart after each; then a
  clean run and an audit of the store (lost, duplicated, integrity, bad promotions) and of
  the processes left behind (orphans);
* ``--bad-files 1000``: hypothesis-generated hostile files fed to a running daemon
  (crashes, anything from outside the inbox stored);
* disk full during ingest and during a stage's checkpoint and adapter save (a tmpfs this
  benchmark mounts; ``null`` with the reason where mounting is refused);
* peak RSS of ``evergreen ingest`` on one 50 MB text file (its own ``VmHWM``);
* vLLM's engine process SIGKILLed while its API server lives: detection, stop, backoff,
  restart and reconcile times; vLLM's whole process group SIGKILLed while idle and at each
  step of a swap; ``evergreen run`` SIGKILLed at each step of a swap and restarted: each
  time, whether the stable name serves the store's current version after
  (``served_mismatch`` counts every fault where it does not; ``benchmarks/_faults_vllm.py``).

The baseline beside each fault is the same path without the fault (the documents each
kill round drops, the clean ingest before the disk fills). Targets: every count 0, every
boolean true, ``peak_ingest_rss_mb_50mb_file`` <= 300, ``engine_recovery_s`` <= 60.
``--smoke`` (CI): 1 kill during ingest (no stages), 30 hostile files, disk full during
ingest only, a 5 MB file, and no vLLM (the engine fields are null): the same code paths
and JSON fields. ``--only vllm``: the vLLM faults alone (the other fields null), to
measure them without the kill loop. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_smoke_flag, report
from tests.faults.badfiles import run_bad_files
from tests.faults.diskfull import MountRefused, run_disk_full, run_stage_disk_full
from tests.faults.kills import run_kills
from tests.harness import ROOT, to_toml

FIELDS = (
    "kills",
    "documents_lost",
    "documents_duplicated",
    "integrity_failures",
    "served_mismatch",
    "orphans",
    "bad_files",
    "crashes",
    "outside_files_ingested",
    "bad_promotions",
    "peak_ingest_rss_mb_50mb_file",
    "disk_full_recovered",
    "vllm_engine_death_recovered",
    "engine_recovery_s",
    "vllm_killed_idle_recovered",
    "vllm_killed_mid_swap_recovered",
    "daemon_killed_mid_swap_recovered",
)
VLLM_FIELDS = (
    "vllm_engine_death_recovered",
    "engine_recovery_s",
    "engine_detect_s",
    "engine_stop_s",
    "engine_backoff_s",
    "engine_restart_s",
    "engine_reconcile_s",
    "vllm_killed_idle_recovered",
    "vllm_killed_mid_swap_recovered",
    "daemon_killed_mid_swap_recovered",
    "vllm_kill_recovery_s",
    "daemon_kill_recovery_s",
)
LINE = "The quick brown fox jumps over the lazy dog near the river bank today, number {}.\n"


def _seed(tmp: Path, given: str) -> Path:
    if given:
        return Path(given)
    from daemon import config as config_mod
    from daemon.training.seed import ensure_seed_model

    cfg = config_mod.from_dict({"state_dir": str(tmp / "seed"), "seed": {"size": "tiny"}})
    print("building the tiny seed model ...", flush=True)
    return ensure_seed_model(cfg)


# The CLI, reporting its own peak RSS as it exits. Not the wait4() ru_maxrss: that
# survives exec, so a child of this (by then ~570 MB) process reported the parent's size.
PEAK_CLI = """
import atexit, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("EVERGREEN_VMHWM_KIB=" + line.split()[1] + "\\n")
atexit.register(_peak)
from daemon.cli import main
main(prog_name="evergreen")
"""


def peak_ingest_rss_mb(tmp: Path, base: Path, mb: int) -> float:
    """``evergreen ingest`` of one ``mb`` MB text file: the process's peak RSS in MB."""
    inbox = tmp / "big-inbox"
    inbox.mkdir()
    with open(inbox / "big.txt", "w", encoding="utf-8") as f:
        i = 0
        while f.tell() < mb * 1_000_000:
            f.write("".join(LINE.format(i + k) for k in range(1000)))
            i += 1000
    config = tmp / "big.toml"
    config.write_text(
        to_toml(
            {
                "state_dir": str(tmp / "big-state"),
                "inbox_dir": str(inbox),
                "base_model": str(base),
                "ingest": {"max_file_bytes": (mb + 10) * 1_000_000},
            }
        )
    )
    cmd = [sys.executable, "-c", PEAK_CLI, "--config", str(config), "ingest", "--json", str(inbox)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    peak = re.search(r"^EVERGREEN_VMHWM_KIB=(\d+)$", proc.stderr, re.M)
    if proc.returncode != 0 or '"ingested": 1' not in proc.stdout or peak is None:
        raise SystemExit(
            f"ingest of the {mb} MB file failed: {proc.stdout[-500:]} {proc.stderr[-2000:]}"
        )
    return round(int(peak.group(1)) / 1024, 1)


def disk_full(tmp: Path, base: Path, stages: bool) -> tuple[bool | None, list[str]]:
    """Disk full during ingest, and (``stages``) during a stage's checkpoint and save."""
    try:
        ingest = run_disk_full(tmp / "disk-ingest", base)
        stage = run_stage_disk_full(tmp / "disk-stage", base) if stages else None
    except MountRefused as exc:
        return None, [f"disk full: skipped ({exc})"]
    ok = ingest.recovered and ingest.full_exit == 1 and (stage is None or stage.recovered)
    lines = [
        f"disk full, ingest: exit {ingest.full_exit}, {ingest.full_error!r}; recovered"
        f" {ingest.recovered}",
        *ingest.problems,
    ]
    if stage is not None:
        lines += [f"disk full, stage: {stage.full_error!r}; recovered {stage.recovered}"]
        lines += stage.problems
    return ok, lines


def _store_faults(
    tmp: Path, base: Path, args: argparse.Namespace, lines: list[str]
) -> dict[str, Any]:
    """Kills, hostile files, disk full and the big ingest: their JSON fields."""
    kills = run_kills(tmp / "kills", base, kills=args.kills, seed=args.seed, train=not args.smoke)
    lines.append(
        f"kills: {kills.kills} by phase {dict(kills.phases)}; {len(kills.dropped)} documents"
        f" dropped (the baseline: what must all be stored) in {kills.seconds:.0f} s"
    )
    bad = run_bad_files(tmp / "bad", base, args.bad_files, seed=args.seed)
    lines.append(f"hostile files: {bad.bad_files} ({bad.kinds}) in {bad.seconds:.0f} s")
    disk_ok, disk_lines = disk_full(tmp, base, stages=not args.smoke)
    lines += disk_lines
    rss = peak_ingest_rss_mb(tmp, base, args.big_file_mb)
    lines.append(f"peak RSS of evergreen ingest on one {args.big_file_mb} MB file: {rss} MB")
    problems = kills.problems + bad.problems
    lines += [f"problem: {p[:300]}" for p in problems[:20]]
    return {
        "kills": kills.kills,
        "documents_lost": kills.documents_lost,
        "documents_duplicated": kills.documents_duplicated,
        "integrity_failures": kills.integrity_failures,
        "orphans": kills.orphans,
        "bad_files": bad.bad_files,
        "crashes": kills.crashes + bad.crashes,
        "outside_files_ingested": bad.outside_files_ingested,
        "bad_promotions": kills.bad_promotions,
        "peak_ingest_rss_mb_50mb_file": rss,
        "disk_full_recovered": disk_ok,
        "stages_failed_by_kills": kills.stages_failed_by_kills,
        "kill_phases": dict(kills.phases),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smoke_flag(parser)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--bad-files", type=int, default=1000)
    parser.add_argument("--big-file-mb", type=int, default=50)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM faults")
    parser.add_argument(
        "--only", choices=["vllm"], default="", help="run only these faults (others: null)"
    )
    parser.add_argument("--base-model", default="", help="HF model dir (default: tiny seed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.kills, args.bad_files, args.big_file_mb, args.no_vllm = 1, 30, 5, True
        args.only = ""
    tmp = Path(tempfile.mkdtemp(prefix="evergreen-faults-"))
    base = _seed(tmp, args.base_model)
    lines: list[str] = [f"load: {os.getloadavg()[0]:.1f} (1-min average) on {os.cpu_count()} cores"]
    t0 = time.monotonic()
    result: dict[str, Any] = {}
    if args.only != "vllm":
        result.update(_store_faults(tmp, base, args, lines))
    else:
        result.update(dict.fromkeys(FIELDS))
    vllm: dict[str, Any] = {"served_mismatch": 0}
    if not args.no_vllm:
        from benchmarks._faults_vllm import vllm_faults

        vllm = vllm_faults(tmp / "vllm", base)
        lines += vllm.pop("lines")
    lines.append(
        f"total {time.monotonic() - t0:.0f} s; own peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    result.update(dict.fromkeys(VLLM_FIELDS))  # null unless the vLLM faults ran
    result.update(vllm)
    result.update(big_file_mb=args.big_file_mb, smoke=args.smoke, only=args.only or None)
    lines.append(f"load now: {os.getloadavg()[0]:.1f} (1-min average)")
    report("faults", lines, result, FIELDS)


if __name__ == "__main__":
    main()
