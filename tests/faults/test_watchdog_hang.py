"""A hung main loop stops the watchdog pings (#12), so systemd restarts the daemon.

The pings come from the main loop, never from a thread of their own. The hang is a real
one: an external vLLM endpoint (a loopback stand-in) that answers ``/health`` but never
answers the reconcile's next call, so the main loop waits out ``serving.request_timeout_s``
in it. While it waits, no ``WATCHDOG=1`` may arrive (a thread pinging regardless would
hide the hang from systemd); once the endpoint answers again, the pings resume. The
datagrams arrive on a real Unix socket, as systemd receives them (``tests/harness.py``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.harness import free_port, start_daemon

pytestmark = [pytest.mark.slow]

WATCHDOG_USEC = 2_000_000  # a ping every second
HANG_S = 12.0


class StuckVLLM(ThreadingHTTPServer):
    """``/health`` is always 200; anything else hangs while ``stuck`` is set, else 500."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        self.stuck = threading.Event()
        self.released = threading.Event()
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: StuckVLLM

    def do_GET(self) -> None:
        if self.path != "/health" and self.server.stuck.is_set():
            self.server.released.wait(120)
        self.send_response(200 if self.path == "/health" else 500)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stuck_vllm() -> Iterator[StuckVLLM]:
    server = StuckVLLM(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


def _pings(notify: list[tuple[float, str]], since: float, until: float) -> list[float]:
    return [t for t, line in list(notify) if line == "WATCHDOG=1" and since <= t <= until]


def test_a_hung_main_loop_stops_the_watchdog_pings(
    tmp_path: Path, tiny_seed_model: Path, stuck_vllm: StuckVLLM
) -> None:
    overrides = {
        "base_model": str(tiny_seed_model),
        "serving": {
            "mode": "external",
            "endpoints": [f"http://127.0.0.1:{stuck_vllm.server_address[1]}"],
            "reconcile_interval_s": 1.0,
            "request_timeout_s": 60.0,
        },
        "policy": {"trigger": {"name": "min_new_tokens", "n": 10**9}},
    }
    env = {"WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with start_daemon(tmp_path, overrides, env=env, poll_s=0.2) as d:
        d.wait_for(d.ready_at, 300, "READY=1")
        time.sleep(4.0)
        now = time.time()
        assert len(_pings(d.notify, now - 4.0, now)) >= 2, d.log_tail()  # healthy: pinging
        stuck_vllm.stuck.set()
        hung_at = time.time()
        time.sleep(HANG_S)
        stuck_vllm.released.set()
        released_at = time.time()
        during = _pings(d.notify, hung_at, released_at)
        times = [hung_at, *during, released_at]
        longest_gap = max(b - a for a, b in itertools.pairwise(times))
        # The next reconcile (within a second or two) hangs the loop until the release.
        assert longest_gap > HANG_S - 4.0, f"pings went on during the hang: {during}"
        d.wait_for(lambda: _pings(d.notify, released_at, time.time()), 30, "pings again")
        assert d.proc.poll() is None
