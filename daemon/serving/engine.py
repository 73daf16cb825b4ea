"""Noticing a dead vLLM engine behind a live API server.

vLLM runs its engine in a child process (``EngineCore``). When that process dies (a crash
in a kernel, the OOM killer), the API server may stay up and answer every completion with
HTTP 500 while ``/health`` still says 200 for a while. :class:`EngineWatch` notices: the
engine process it saw at start-up is gone, a periodic 1-token completion on the base model
fails twice in a row (HTTP 5xx or refused; a slow answer is no verdict), or the API server
exited with an engine-death line in its log.
"""

from __future__ import annotations

import logging
import time

import psutil

from daemon.serving.client import VLLMClient

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 30.0  # a 1-token base-model completion this often while up
PROBE_TIMEOUT_S = 10.0
PROBE_FAILURES = 2  # consecutive failed probes that mean a dead engine
ENGINE_MARKERS = ("EngineCore",)
DEATH_LINES = ("EngineDeadError", "died unexpectedly", "Engine core proc")


def engine_pids(api_pid: int) -> list[int]:
    """The engine-core processes under the API server (by process title)."""
    try:
        children = psutil.Process(api_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            title = " ".join(child.cmdline()) + " " + child.name()
        except psutil.Error:
            continue
        if any(marker in title for marker in ENGINE_MARKERS):
            found.append(child.pid)
    return found


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class EngineWatch:
    """Per server start: :meth:`arm` once healthy, :meth:`dead` on every supervision step."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.armed = False  # a healthy server is being watched
        self.next_probe = 0.0
        self.failures = 0

    def arm(self, api_pid: int) -> None:
        self.pids = engine_pids(api_pid)
        self.armed = True
        self.next_probe = time.monotonic() + PROBE_INTERVAL_S
        self.failures = 0

    def disarm(self) -> None:
        self.pids = []
        self.armed = False

    def dead(self, client: VLLMClient, model: str) -> str:
        """Why the engine is dead ("" while it looks alive); probes at most once a call."""
        gone = [pid for pid in self.pids if not _running(pid)]
        if gone:
            return f"engine process {gone[0]} is gone"
        now = time.monotonic()
        if now < self.next_probe:
            return ""
        ok = client.probe(model, timeout=PROBE_TIMEOUT_S)
        if ok is None:  # slow (a busy server), not dead: no verdict
            self.next_probe = now + PROBE_INTERVAL_S
            return ""
        self.failures = 0 if ok else self.failures + 1
        # Retry soon after a failure; the normal pace otherwise.
        self.next_probe = now + (PROBE_INTERVAL_S if ok else 1.0)
        if self.failures >= PROBE_FAILURES:
            return f"{self.failures} engine probes (1-token completions) failed"
        return ""


def died_in_log(log_tail: str, start_marker: str) -> bool:
    """Whether an exited API server's log (since its last start) says its engine died."""
    run = log_tail.rsplit(start_marker, 1)[-1]
    return any(line in run for line in DEATH_LINES)
