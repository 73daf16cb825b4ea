"""SIGKILL the daemon at random moments, restart it, and audit what is left.

Shared by ``tests/faults/test_kills.py`` (CI size) and ``benchmarks/faults.py`` (``--kills
100``). One state dir lives through every round: each round drops new documents (each its
own text) into the inbox, starts ``evergreen run`` (``tests/harness.py``), waits a random
time while it ingests, trains, evaluates and promotes (a 1-token trigger and a short
stage keep it busy), and SIGKILLs the daemon alone, as the OOM killer would: its stage
subprocess is left for the next daemon to deal with. A last daemon runs until everything
is stored and no stage is active, stops cleanly, and :mod:`tests.faults.audit` counts
what went wrong. No pytest here: a benchmark imports it.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults import audit
from tests.harness import Daemon, HarnessError, daemon_config, merge

# A short stage on the tiny seed: every ingest triggers one, so kills land in stages too.
KILL_CONFIG: dict[str, Any] = {
    "stop_grace_s": 20.0,
    "ingest": {"quiet_period_s": 0.3, "chunk_tokens": 64, "holdout_fraction": 0.2},
    # Policies that read no scores: no scorer run before each stage (on 2 busy cores it
    # takes a minute, and a killed one starts over), so kills reach the stage's phases.
    "policy": {
        "interval_s": 1.0,
        "trigger": {"name": "min_new_tokens", "n": 1},
        "selection": {"name": "fifo"},
        "replay": {"name": "uniform"},
    },
    "training": {
        "lora_rank": 8,
        "min_steps": 0,
        "passes": 0.0,
        "epochs": 1.0,
        "max_steps": 6,
        "checkpoint_every": 2,
        "batch_tokens": 256,
    },
}
# Where kills land, in turn: ingest, training, evaluation, gate and promotion, anywhere.
TARGETS = ("ingest", "stage:running", "stage:trained", "stage:evaluated", "")
ORPHAN_GRACE_S = 30.0  # a warm stage process still importing torch notices EOF after that
TEXT = (
    "Record {i}: the lighthouse keeper number {i} logs {w} storms, counts {n} gulls and "
    "writes the tide table for harbour {h} by lamp light every evening without fail."
)


@dataclass
class KillReport:
    kills: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    dropped: list[Path] = field(default_factory=list)
    documents_lost: int = 0
    documents_duplicated: int = 0
    integrity_failures: int = 0
    orphans: int = 0
    bad_promotions: int = 0
    stages_failed_by_kills: int = 0
    crashes: int = 0  # a daemon that exited on its own (not our kill) during a round
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def drop_documents(inbox: Path, start: int, n: int, rng: random.Random) -> list[Path]:
    out = []
    for i in range(start, start + n):
        path = inbox / f"doc-{i:05d}.txt"
        text = TEXT.format(i=i, w=rng.randrange(999), n=rng.randrange(999), h=rng.randrange(99))
        path.write_text(text * rng.randint(1, 4), encoding="utf-8")
        out.append(path)
    return out


def _daemon(where: Path, config: dict[str, Any], env: dict[str, str]) -> Daemon:
    where.mkdir(parents=True, exist_ok=True)
    return Daemon(where, config, env, poll_s=0.5)


def _phase(d: Daemon) -> str:
    return audit.phase(d.state_dir / "evergreen.db", d.inbox, d.proc.pid)


def _wait_for_phase(d: Daemon, target: str, max_wait_s: float, rng: random.Random) -> None:
    """Until the daemon is in ``target`` (a phase prefix; "" = a random moment) or
    ``max_wait_s`` passed, then a random fraction of a second more."""
    deadline = time.monotonic() + (rng.uniform(0.5, max_wait_s) if not target else max_wait_s)
    while time.monotonic() < deadline and d.proc.poll() is None:
        if target and _phase(d).startswith(target):
            break
        time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 0.5))


def _kill(d: Daemon, report: KillReport) -> None:
    report.phases[_phase(d)] += 1
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=30)
    report.kills += 1


def _settled(d: Daemon, dropped: list[Path]) -> bool:
    db = d.state_dir / "evergreen.db"
    if audit.active_stages(db):
        return False
    return not audit.documents_lost(db, dropped)


def run_kills(
    tmp: Path,
    base_model: Path,
    *,
    kills: int,
    docs_per_round: int = 3,
    max_wait_s: float = 60.0,
    seed: int = 0,
    settle_s: float = 600.0,
    overrides: dict[str, Any] | None = None,
    train: bool = True,
) -> KillReport:
    """``kills`` rounds of drop-start-wait-SIGKILL, a last clean run, then the audit.
    ``train=False``: the trigger never fires (ingest only, for a quick smoke run)."""
    rng = random.Random(seed)
    config = daemon_config(tmp, merge(KILL_CONFIG, {"base_model": str(base_model)}))
    config = merge(config, {"serving": {**config["serving"], "mode": "none"}})
    if not train:
        never = {"name": "min_new_tokens", "n": 10**9}
        config = merge(config, {"policy": {**config["policy"], "trigger": never}})
    config = merge(config, overrides or {})
    report = KillReport()
    t0 = time.monotonic()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    inbox = Path(config["inbox_dir"])
    inbox.mkdir(parents=True, exist_ok=True)
    for round_no in range(kills):
        report.dropped += drop_documents(inbox, len(report.dropped), docs_per_round, rng)
        d = _daemon(tmp / f"round-{round_no:04d}", config, env)
        try:
            _wait_for_phase(d, TARGETS[round_no % len(TARGETS)], max_wait_s, rng)
            if d.proc.poll() is not None:
                report.crashes += 1
                report.problems.append(f"round {round_no}: exited {d.proc.returncode}")
                report.problems.append(d.log_tail(1500))
                continue
            _kill(d, report)
        finally:
            d.close()
    _final_run(tmp, config, env, report, settle_s)
    report.seconds = time.monotonic() - t0
    return report


def _final_run(
    tmp: Path, config: dict[str, Any], env: dict[str, str], report: KillReport, settle_s: float
) -> None:
    d = _daemon(tmp / "final", config, env)
    try:
        d.wait_for(d.ready_at, settle_s, "READY=1")
        d.wait_for(lambda: _settled(d, report.dropped), settle_s, "every document stored")
    except HarnessError as exc:
        report.problems.append(f"final run: {exc}\n{d.log_tail(2000)}")
    finally:
        code = d.stop()
        d.close()
    if code != 0:
        report.crashes += 1
        report.problems.append(f"final daemon exited {code}")
    audit_into(report, Path(config["state_dir"]))


def audit_into(report: KillReport, state_dir: Path) -> None:
    db = state_dir / "evergreen.db"
    lost = audit.documents_lost(db, report.dropped)
    report.documents_lost = len(lost)
    report.documents_duplicated = audit.documents_duplicated(db)
    integrity = audit.integrity_failures(db)
    report.integrity_failures = len(integrity)
    bad = audit.bad_promotions(db)
    report.bad_promotions = len(bad)
    failed = audit.stages_failed_by_kills(db)
    report.stages_failed_by_kills = len(failed)
    orphans = audit.orphan_processes(str(state_dir), grace_s=ORPHAN_GRACE_S)
    report.orphans = len(orphans)
    report.problems += [f"lost: {p}" for p in lost[:5]] + integrity + bad + failed + orphans
