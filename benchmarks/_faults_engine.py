"""The engine-death part of ``benchmarks/faults.py`` (not a benchmark of its own).

A managed vLLM (``ManagedVLLM``, as the daemon runs it) serves one promoted adapter under
the stable name. Its EngineCore process is SIGKILLed while the API process lives;
``check()`` is then called at the daemon's pace (``SUPERVISE_INTERVAL_S``), and the time
to recovery is split into detection (kill -> the watch declares the engine dead), stop
(ending the old process group), backoff (-> the new vLLM launched), restart (-> ``check()``
sees it healthy) and reconcile (the stable name re-pointed: the ``on_restart`` callback).
Recovery ends when the stable name answers a completion again. :func:`managed` is the
server the other vLLM faults (``benchmarks/_faults_vllm.py``) reuse: one cold start.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon import config as config_mod
from daemon.config import Config
from daemon.service import SUPERVISE_INTERVAL_S
from daemon.serving import promotion
from daemon.serving.client import VLLMError
from daemon.serving.engine import engine_pids
from daemon.serving.swap import Swapper
from daemon.serving.vllm import ManagedVLLM
from tests.faults import audit
from tests.fixtures_vllm import free_port, make_lora

WAIT_S = 400.0


@contextmanager
def managed(
    state: Path, base: Path, make_server: Callable[[Config], ManagedVLLM] = ManagedVLLM
) -> Iterator[tuple[ManagedVLLM, Swapper, float]]:
    """A managed vLLM (as the daemon runs it) serving v0001 under the stable name, with
    v0002 registered; the swapper reconciles on every restart. Yields (server, swapper,
    cold start seconds); raises RuntimeError when vLLM does not start."""
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
    make_lora(cfg, "v0002", seed=2, rank=8)
    server = make_server(cfg)
    started = time.monotonic()
    server.start()
    swapper = Swapper(cfg, [server.endpoint])
    server.on_restart.append(swapper.reconcile)  # as the daemon does
    try:
        if not server.wait_healthy():
            raise RuntimeError(f"vLLM did not start: {server.last_error}")
        boot_s = time.monotonic() - started
        promotion.promote(cfg, "v0001", "faults benchmark", swapper=swapper)
        yield server, swapper, boot_s
    finally:
        server.stop()


def _timed(marks: list[tuple[str, float, float]], name: str, fn: Callable[..., Any]) -> Any:
    """``fn`` that appends (name, start, end) to ``marks`` at every call (instrumentation)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            marks.append((name, t, time.monotonic()))

    return wrapper


def engine_death(
    server: ManagedVLLM, swapper: Swapper, boot_s: float, pace_s: float = SUPERVISE_INTERVAL_S
) -> dict[str, Any]:
    """SIGKILL the engine process of ``server`` (up, serving) and time its recovery: detect
    (kill -> the watch declares it dead and starts stopping the group), stop (ending the
    old group), backoff (-> the new vLLM is launched), restart (-> ``check()`` sees it
    healthy), reconcile (the ``on_restart`` callback). ``check()`` runs every ``pace_s``."""
    cfg = server.cfg
    out: dict[str, Any] = {"recovered": False, "seconds": None, "served_mismatch": 1, "lines": []}
    marks: list[tuple[str, float, float]] = []
    saved, server.on_restart = server.on_restart, [_timed(marks, "reconcile", swapper.reconcile)]
    server._kill_group = _timed(marks, "stop", server._kill_group)  # type: ignore[method-assign]
    server.start = _timed(marks, "start", server.start)  # type: ignore[method-assign]
    try:
        expected = server.endpoint.completion("evergreen", "def main", max_tokens=8)
        assert server.proc is not None
        (engine,) = engine_pids(server.proc.pid)
        server.check()
        killed = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        healthy = None
        while time.monotonic() - killed < WAIT_S:
            if server.check():
                healthy = time.monotonic()
                break
            time.sleep(pace_s)
        starts = [m for m in marks if m[0] == "start"]
        # The stops before the relaunch (start() itself calls one, on nothing by then).
        stops = [m for m in marks if m[0] == "stop" and starts and m[2] <= starts[-1][1]]
        reconciles = [m for m in marks if m[0] == "reconcile"]
        if healthy is None or not (stops and starts and reconciles):
            out["lines"].append(f"vLLM not back in {WAIT_S:.0f} s:\n{server.log_tail(30)}")
            return out
        answer = None
        while answer is None and time.monotonic() - killed < WAIT_S:  # the stable name again
            try:
                answer = server.endpoint.completion("evergreen", "def main", max_tokens=8)
            except VLLMError:
                time.sleep(0.2)
        answered = time.monotonic()
        served = swapper.served_version()
        current = audit.current_version(cfg.db_path)
        stop_s = sum(end - begin for _, begin, end in stops)
        reconcile_s = reconciles[-1][2] - reconciles[-1][1]
        out.update(
            recovered=answer == expected and served == current,
            seconds=round(answered - killed, 1),
            detect_s=round(stops[0][1] - killed, 1),
            stop_s=round(stop_s, 1),
            backoff_s=round(starts[-1][1] - stops[-1][2], 1),
            restart_s=round(reconciles[-1][1] - starts[-1][1], 1),
            reconcile_s=round(reconcile_s, 1),
            served_mismatch=int(served != current),
        )
        out["lines"].append(
            f"engine death: recovered in {out['seconds']} s (detect {out['detect_s']} s,"
            f" stop {out['stop_s']} s, backoff {out['backoff_s']} s, restart"
            f" {out['restart_s']} s, reconcile {out['reconcile_s']} s; a cold vLLM start took"
            f" {boot_s:.1f} s); serves {served}, store current {current}"
        )
        return out
    finally:
        server.on_restart = saved
        del server._kill_group, server.start  # the class's own methods again
