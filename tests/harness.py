"""The daemon as a real subprocess, for the end-to-end test and the freshness benchmark.

One home for what both need: a config file written from a dict, ``python -m daemon run``
launched with a NOTIFY_SOCKET receiver (as systemd would run it), waiting on a condition
while watching that the daemon is still alive, ``/metrics`` and ``/status`` scraping, the
audit log's event times, and a stop that leaves no process behind.

It lives in ``tests/`` because it is test infrastructure, like the fixtures
``benchmarks/swap.py`` already imports from here: benchmarks depend on tests' helpers,
never the other way round, and pytest needs nothing from ``benchmarks/``. It imports no
pytest, so a benchmark can use it as a plain module.

    with start_daemon(tmp, {"training": {...}}) as d:
        d.wait_for(d.ready, 600, "READY=1")
        ...
        assert d.stop() == 0
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class HarnessError(AssertionError):
    """The daemon exited, or a condition did not hold in time (fails a test plainly)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def to_toml(data: Mapping[str, Any]) -> str:
    """Top-level keys, then one ``[section]`` per dict; deeper dicts are inline tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for section, body in data.items():
        if isinstance(body, Mapping):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (one level deep, like a config)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def scrape(url: str) -> dict[str, float]:
    """Prometheus text at ``url`` as ``{'name{label=value,...}': value}``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Daemon:
    """A running ``evergreen run`` subprocess and what it serves (see :func:`start_daemon`)."""

    def __init__(
        self, tmp: Path, config: dict[str, Any], env: Mapping[str, str], *, poll_s: float = 1.0
    ) -> None:
        self.tmp = tmp
        self.config = config
        self.state_dir = Path(config["state_dir"])
        self.inbox = Path(config["inbox_dir"])
        self.config_path = tmp / "evergreen.toml"
        self.log_path = tmp / "daemon.log"
        self.metrics_url = f"http://127.0.0.1:{config['metrics']['port']}"
        self.vllm_port = int(config["serving"]["port"])
        self.vllm_url = f"http://127.0.0.1:{self.vllm_port}"
        self.poll_s = poll_s
        self.notify: list[tuple[float, str]] = []  # (time received, line), like systemd sees
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(config), encoding="utf-8")

        self._sock_path = str(tmp / "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self._sock_path)
        self._sock.settimeout(0.5)
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        full_env = {**os.environ, **env, "NOTIFY_SOCKET": self._sock_path}
        full_env.pop("WATCHDOG_PID", None)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(self.config_path), "run"],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _drain(self) -> None:  # like systemd, keep reading: the daemon must never block on us
        while not self._done.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.notify.extend((time.time(), line) for line in data.decode().splitlines())

    # ------------------------------------------------------------------ waiting, reading
    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Poll ``predicate`` until it returns a truthy value (returned); fail if the daemon
        exits first or ``timeout`` passes. HTTP/OS/parse errors count as "not yet"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"daemon exited ({self.proc.returncode}) while waiting for {what}"
                )
            try:
                value = predicate()
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                value = None  # type: ignore[assignment]
            if value:
                return value
            time.sleep(self.poll_s)
        raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}")

    def ready_at(self) -> float | None:
        """When READY=1 arrived on the notify socket (None: not yet)."""
        return next((t for t, line in list(self.notify) if line == "READY=1"), None)

    def healthy(self) -> bool:
        return httpx.get(f"{self.metrics_url}/healthz", timeout=2).status_code == 200

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.metrics_url}/status", timeout=10).json())

    def promoted(self) -> bool:
        return bool(self.status()["stages"].get("promoted"))

    def metrics(self) -> dict[str, float]:
        return scrape(f"{self.metrics_url}/metrics")

    def api_key(self) -> str:
        return (self.state_dir / "vllm-api-key").read_text().strip()

    def complete(self, prompt: str, max_tokens: int = 8, model: str = "evergreen") -> str:
        """Greedy completion from the managed vLLM (plain HTTP, the daemon's API key)."""
        r = httpx.post(
            f"{self.vllm_url}/v1/completions",
            timeout=30,
            headers={"Authorization": f"Bearer {self.api_key()}"},
            json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        )
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])

    def event_times(self) -> dict[str, float]:
        """First time each event kind happened (the store's audit log is the phase clock)."""
        conn = sqlite3.connect(self.state_dir / "evergreen.db")
        try:
            rows = conn.execute("SELECT kind, MIN(ts) FROM events GROUP BY kind").fetchall()
        finally:
            conn.close()
        return {kind: float(ts) for kind, ts in rows}

    def events(self, last: int = 40) -> list[tuple[str, str]]:
        db = self.state_dir / "evergreen.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(db)
        try:
            rows = conn.execute("SELECT kind, message FROM events ORDER BY id").fetchall()
        finally:
            conn.close()
        return [(str(k), str(m)) for k, m in rows[-last:]]

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    # ------------------------------------------------------------------ stopping
    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM the daemon (it stops its stage and vLLM) and wait; SIGKILL whatever of
        its tree is left after ``timeout``. Returns its exit status."""
        if self.proc.poll() is None:
            tree = [psutil.Process(self.proc.pid)]
            with suppress(psutil.NoSuchProcess):
                tree += psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            _gone, alive = psutil.wait_procs(tree, timeout=10)
            for p in alive:
                p.kill()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._log.close()
        self._done.set()
        self._reader.join(timeout=5)
        self._sock.close()


def daemon_config(tmp: Path, overrides: Mapping[str, Any] = {}) -> dict[str, Any]:
    """A config for a daemon under test: state and inbox in ``tmp``, free ports, the tiny
    seed model, a fast-settling inbox; ``overrides`` merge in section by section."""
    base: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "inbox_dir": str(tmp / "inbox"),
        "seed": {"size": "tiny"},
        "ingest": {"quiet_period_s": 0.5},
        "serving": {"port": free_port()},
        "metrics": {"port": free_port()},
    }
    return merge(base, overrides)


@contextmanager
def start_daemon(
    tmp: Path,
    overrides: Mapping[str, Any] = {},
    *,
    env: Mapping[str, str] = {},
    poll_s: float = 1.0,
) -> Iterator[Daemon]:
    """Write the config (:func:`daemon_config` + ``overrides``), start the daemon, yield it,
    and on exit stop it and everything it started. vLLM gets a 1 GiB KV cache unless
    ``env`` says otherwise."""
    config = daemon_config(tmp, overrides)
    daemon = Daemon(tmp, config, {"VLLM_CPU_KVCACHE_SPACE": "1", **env}, poll_s=poll_s)
    try:
        yield daemon
    finally:
        daemon.close()
