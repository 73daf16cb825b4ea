"""The vLLM parts of ``benchmarks/faults.py`` (not a benchmark of its own).

On one managed vLLM (one cold start, :func:`benchmarks._faults_engine.managed`), in turn:
its engine process SIGKILLed while the API server lives (the recovery time and its
breakdown), its whole process group SIGKILLed while idle, and SIGKILLed at each point of a
promotion's swap (``tests/faults/vllm_kills.py``); then ``evergreen run`` itself SIGKILLed
at each point of a swap and restarted (``tests/faults/daemon_swap_kills.py``). Supervision
runs at the daemon's pace (``SUPERVISE_INTERVAL_S``). Every fault counts into
``served_mismatch`` when the stable name does not serve the store's current version after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._faults_engine import WAIT_S, engine_death, managed
from daemon.service import SUPERVISE_INTERVAL_S
from tests.faults.daemon_swap_kills import run_daemon_swap_kills
from tests.faults.vllm_kills import SWAP_POINTS, KillOutcome, kill_idle, kill_mid_swap
from tests.harness import HarnessError


def vllm_faults(tmp: Path, base: Path) -> dict[str, Any]:
    """Every vLLM fault; the fields of the JSON line and the summary ``lines``."""
    out: dict[str, Any] = {
        "vllm_engine_death_recovered": False,
        "engine_recovery_s": None,
        "vllm_killed_idle_recovered": False,
        "vllm_killed_mid_swap_recovered": False,
        "daemon_killed_mid_swap_recovered": False,
        "vllm_kill_recovery_s": {},
        "served_mismatch": 0,
        "lines": [],
    }
    kills: list[KillOutcome] = []
    try:
        with managed(tmp / "vllm", base) as (server, swapper, boot_s):
            engine = engine_death(server, swapper, boot_s)
            out["lines"] += engine["lines"]
            out.update(
                vllm_engine_death_recovered=engine["recovered"],
                engine_recovery_s=engine["seconds"],
                **{f"engine_{k}": engine.get(k) for k in ("detect_s", "stop_s", "backoff_s")},
                **{f"engine_{k}": engine.get(k) for k in ("restart_s", "reconcile_s")},
            )
            out["served_mismatch"] += engine["served_mismatch"]
            pace = {"wait_s": WAIT_S, "pace_s": SUPERVISE_INTERVAL_S}
            kills.append(kill_idle(server, swapper, **pace))
            for at in SWAP_POINTS:
                kills.append(kill_mid_swap(server, swapper, "v0002", at, **pace))
    except RuntimeError as exc:  # vLLM never started: every vLLM verdict stays false
        out["lines"].append(str(exc))
        out["served_mismatch"] += 1
    out["lines"] += [k.line() for k in kills]
    out["served_mismatch"] += sum(k.mismatch for k in kills)
    out["vllm_kill_recovery_s"] = {k.where: k.seconds for k in kills}
    idle, mid = kills[:1], kills[1:]
    out["vllm_killed_idle_recovered"] = bool(idle) and all(k.recovered for k in idle)
    out["vllm_killed_mid_swap_recovered"] = bool(mid) and all(k.recovered for k in mid)

    try:
        daemon = run_daemon_swap_kills(tmp / "daemon", base)
    except HarnessError as exc:  # a daemon that never became ready
        out["lines"].append(f"daemon mid-swap kills: {exc}"[:3000])
        out["served_mismatch"] += 1
        daemon = []
    out["lines"] += [d.line() for d in daemon]
    out["served_mismatch"] += sum(d.mismatch for d in daemon)
    out["daemon_killed_mid_swap_recovered"] = bool(daemon) and all(d.recovered for d in daemon)
    out["daemon_kill_recovery_s"] = {d.where: d.seconds for d in daemon}
    return out
