"""The engine-death part of ``benchmarks/faults.py`` (not a benchmark of its own).

A managed vLLM (``ManagedVLLM``, as the daemon runs it) serves one promoted adapter under
the stable name. Its EngineCore process is SIGKILLed while the API process lives;
``check()`` is then called at the daemon's pace (``SUPERVISE_INTERVAL_S``), and the time
to recovery is split into detection (kill -> the watch declares the engine dead), restart
(-> the new server answers ``/health``) and reconcile (the stable name re-pointed: the
``on_restart`` callback). Recovery ends when the stable name answers a completion again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from daemon import config as config_mod
from daemon.service import SUPERVISE_INTERVAL_S
from daemon.serving import promotion
from daemon.serving.engine import engine_pids
from daemon.serving.swap import Swapper
from daemon.serving.vllm import ManagedVLLM
from tests.faults import audit
from tests.fixtures_vllm import free_port, make_lora

WAIT_S = 400.0


def engine_death(state: Path, base: Path) -> dict[str, Any]:
    state.mkdir(parents=True)
    cfg = config_mod.from_dict(
        {
            "state_dir": str(state),
            "base_model": str(base),
            "training": {"lora_rank": 16},
            "serving": {
                "port": free_port(),
                "max_lora_rank": 16,
                "max_loras": 4,
                "max_model_len": 512,
                "kvcache_space_gib": 1,
            },
        }
    )
    make_lora(cfg, "v0001", seed=1, rank=8)
    server = ManagedVLLM(cfg)
    out: dict[str, Any] = {"recovered": False, "seconds": None, "served_mismatch": 1, "lines": []}
    started = time.monotonic()
    server.start()
    try:
        if not server.wait_healthy():
            out["lines"].append(f"vLLM did not start: {server.last_error}")
            return out
        boot_s = time.monotonic() - started
        swapper = Swapper(cfg, [server.endpoint])
        reconciled: list[float] = []

        def timed_reconcile() -> None:
            t = time.monotonic()
            swapper.reconcile()
            reconciled.append(time.monotonic() - t)

        server.on_restart.append(timed_reconcile)
        promotion.promote(cfg, "v0001", "faults benchmark", swapper=swapper)
        expected = server.endpoint.completion("evergreen", "def main", max_tokens=8)
        assert server.proc is not None
        (engine,) = engine_pids(server.proc.pid)
        server.check()
        killed = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        detected = healthy = None
        while time.monotonic() - killed < WAIT_S:
            if server.check():
                healthy = time.monotonic()
                break
            if detected is None and server.last_error.startswith("engine dead"):
                detected = time.monotonic()
            time.sleep(SUPERVISE_INTERVAL_S)
        if healthy is None or detected is None:
            out["lines"].append(f"vLLM not back in {WAIT_S:.0f} s:\n{server.log_tail(30)}")
            return out
        while time.monotonic() - killed < WAIT_S:  # the stable name answers again
            try:
                answer = server.endpoint.completion("evergreen", "def main", max_tokens=8)
                break
            except Exception:
                time.sleep(0.2)
        answered = time.monotonic()
        served = swapper.served_version()
        current = audit.current_version(cfg.db_path)
        reconcile_s = reconciled[-1] if reconciled else 0.0
        out.update(
            recovered=answer == expected and served == current,
            seconds=round(answered - killed, 1),
            detect_s=round(detected - killed, 1),
            restart_s=round(healthy - detected - reconcile_s, 1),
            reconcile_s=round(reconcile_s, 1),
            served_mismatch=int(served != current),
        )
        out["lines"].append(
            f"engine death: recovered in {out['seconds']} s (detect {out['detect_s']} s,"
            f" restart {out['restart_s']} s, reconcile {out['reconcile_s']} s; a cold vLLM"
            f" start took {boot_s:.1f} s); serves {served}, store current {current}"
        )
        return out
    finally:
        server.stop()
