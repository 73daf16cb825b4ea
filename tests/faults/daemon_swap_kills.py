"""SIGKILL ``evergreen run`` (managed vLLM) in the middle of a promotion's swap (#12).

Shared by ``tests/faults/test_daemon_swap_kill.py`` (one round) and
``benchmarks/_faults_vllm.py`` (every point). No pytest here: a benchmark imports it.

The daemon performs a promotion an operator asked for (``evergreen promote``: a request in
the store its main loop performs with its own swapper) and is SIGKILLed alone, as the OOM
killer would, the moment its vLLM's log shows the swap at a chosen step:

* ``loaded``: the new version is loaded; the smoke completion, the flip, the verify and the
  pointer move are still to come;
* ``flipped``: the stable name was re-pointed; the verify and the pointer move are not done.

Its vLLM outlives it (own process group, as outside systemd) and keeps serving whatever the
swap left; what it serves right then is recorded (``orphan_served``). A new daemon is
started on the same state dir: it must replace that vLLM and, once READY, serve under the
stable name the store's current version (whatever the killed promotion got to record),
and the interrupted request must be answered (failed), not left running for ever.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import config as config_mod
from daemon.config import Config
from daemon.serving.adapters import served_name
from daemon.serving.apikey import load_or_create_admin_secret, load_or_create_api_key
from daemon.serving.audit import store_db
from daemon.serving.client import VLLMClient, VLLMError
from daemon.serving.procs import group_alive
from daemon.serving.requests import ask_daemon
from store import requests as store_requests
from tests.faults import audit
from tests.fixtures_vllm import make_lora
from tests.harness import Daemon, HarnessError, daemon_config

# What the vLLM log shows at each point ({name}: the new version's served name).
DAEMON_POINTS = {
    "loaded": "Loaded new LoRA adapter: name '{name}'",
    "flipped": '"POST /v1/evergreen/alias HTTP/1.1" 200',
}
PROMPT = "def main"
START_WAIT_S = 600.0  # a daemon's start: a vLLM cold start (~30 s quiet, minutes loaded)
SERVING = {"max_lora_rank": 16, "max_loras": 4, "max_model_len": 512, "kvcache_space_gib": 1}


@dataclass
class DaemonKillOutcome:
    where: str
    recovered: bool = False
    orphan_served: str | None = None  # what the killed daemon's vLLM served after the kill
    killed_current: str | None = None  # the store's current version right after the kill
    served: str | None = None  # what the restarted daemon's vLLM serves
    current: str | None = None  # the store's current version after the restart
    request: str = ""  # the interrupted request's status and message after the restart
    seconds: float | None = None  # kill -> the new daemon READY and serving
    problems: list[str] = field(default_factory=list)

    @property
    def mismatch(self) -> int:
        return int(not self.recovered)

    def line(self) -> str:
        took = f"{self.seconds:.1f} s" if self.seconds is not None else "never"
        return (
            f"daemon SIGKILLed mid-swap ({self.where}): recovered {self.recovered} in {took};"
            f" at the kill the store said {self.killed_current} and the orphaned vLLM served"
            f" {self.orphan_served}; after the restart serves {self.served}, store current"
            f" {self.current}; request: {self.request}"
            + "".join(f"\n  problem: {p}" for p in self.problems)
        )


def _client(cfg: Config) -> VLLMClient:
    return VLLMClient(
        f"http://127.0.0.1:{cfg.serving.port}",
        load_or_create_api_key(cfg),
        timeout=60,
        admin_secret=load_or_create_admin_secret(cfg),
    )


def _serves(cfg: Config) -> str | None:
    """The version the stable name is an alias of on the server now (None: cannot tell)."""
    client = _client(cfg)
    try:
        target = (client.aliases().get(cfg.serving.model_name) or {}).get("target") or ""
    except VLLMError:
        return None
    finally:
        client.close()
    prefix = cfg.serving.model_name + "-"
    return target[len(prefix) :] if target.startswith(prefix) else None


def _start(where: Path, config: dict[str, Any]) -> Daemon:
    where.mkdir(parents=True, exist_ok=True)
    d = Daemon(where, config, {"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        d.wait_for(d.ready_at, START_WAIT_S, "READY=1")
    except HarnessError as exc:
        tail = d.log_tail(3000)
        d.close()
        raise HarnessError(f"{exc}\n{tail}") from exc
    return d


def _wait_for_point(d: Daemon, cfg: Config, request_id: int, needle: str, offset: int) -> str:
    """Poll the vLLM log (every few ms) until ``needle`` appears after ``offset``; ""
    then, else why not (the request finished first, or the daemon died)."""
    log = cfg.logs_dir / "vllm.log"
    seen = b""
    next_row = time.monotonic()
    deadline = time.monotonic() + 300
    with open(log, "rb") as f:
        f.seek(offset)
        while time.monotonic() < deadline:
            seen = seen[-4096:] + f.read()
            if needle.encode() in seen:
                return ""
            if d.proc.poll() is not None:
                return f"the daemon exited ({d.proc.returncode}) before the swap got there"
            if time.monotonic() >= next_row:  # the store now and then, the log every 2 ms
                with store_db(cfg) as db:
                    row = store_requests.get(db, request_id) or {}
                if row.get("status") in store_requests.FINISHED:
                    return f"the request finished first: {row.get('status')} {row.get('message')}"
                next_row = time.monotonic() + 0.5
            time.sleep(0.002)
    return "the swap never got there in 300 s"


def _request(cfg: Config, request_id: int, wait_s: float) -> dict[str, Any]:
    """The request's row, once finished or after ``wait_s`` (the new daemon's main loop
    answers what its predecessor left running within a second of READY)."""
    deadline = time.monotonic() + wait_s
    while True:
        with store_db(cfg) as db:
            row = store_requests.get(db, request_id) or {}
        if row.get("status") in store_requests.FINISHED or time.monotonic() > deadline:
            return row
        time.sleep(0.2)


def _judge(cfg: Config, out: DaemonKillOutcome, request_id: int) -> None:
    out.current = audit.current_version(cfg.db_path)
    out.served = _serves(cfg)
    row = _request(cfg, request_id, 15.0)
    out.request = f"{row.get('status')}: {row.get('message')}"
    if row.get("status") not in store_requests.FINISHED:
        out.problems.append(f"the interrupted request is still {row.get('status')}")
    client = _client(cfg)
    try:
        stable = client.completion(cfg.serving.model_name, PROMPT, max_tokens=8)
        pinned = client.completion(served_name(cfg, out.current or "base"), PROMPT, max_tokens=8)
    except VLLMError as exc:
        out.problems.append(f"the restarted vLLM does not answer: {exc}")
        return
    finally:
        client.close()
    if stable != pinned:
        out.problems.append(f"the stable name answers {stable!r}, {out.current} {pinned!r}")
    if out.served != out.current:
        out.problems.append(f"the stable name serves {out.served}, the store says {out.current}")
    out.recovered = not out.problems


def kill_round(
    d: Daemon, cfg: Config, config: dict[str, Any], version: str, *, at: str, where: Path
) -> tuple[DaemonKillOutcome, Daemon]:
    """Ask ``d`` to promote ``version``, SIGKILL it at ``at``, start a new daemon in
    ``where``; the outcome and the new daemon (the caller closes it)."""
    out = DaemonKillOutcome(at)
    log = cfg.logs_dir / "vllm.log"
    offset = log.stat().st_size
    with store_db(cfg) as db:
        request_id = store_requests.submit(
            db, "promote", {"version": version}, track=cfg.track, timeout_s=300
        )
    needle = DAEMON_POINTS[at].format(name=served_name(cfg, version))
    missed = _wait_for_point(d, cfg, request_id, needle, offset)
    d.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    d.proc.wait()
    d.close()
    if missed:
        out.problems.append(missed)
    out.killed_current = audit.current_version(cfg.db_path)
    out.orphan_served = _serves(cfg)
    orphan = int((cfg.state_path / "vllm.pgid").read_text())
    new = _start(where, config)
    out.seconds = round(time.monotonic() - killed, 1)
    if group_alive(orphan):
        out.problems.append(f"the killed daemon's vLLM (group {orphan}) is still running")
    _judge(cfg, out, request_id)
    return out, new


def run_daemon_swap_kills(
    tmp: Path, base: Path, points: tuple[str, ...] = tuple(DAEMON_POINTS)
) -> list[DaemonKillOutcome]:
    """One daemon, one promotion of v0001, then a killed promotion per point in turn."""
    config = daemon_config(
        tmp, {"base_model": str(base), "serving": SERVING, "training": {"lora_rank": 16}}
    )
    cfg: Config = config_mod.from_dict(config)
    versions = [f"v{i:04d}" for i in range(1, len(points) + 2)]
    for i, version in enumerate(versions, start=1):
        make_lora(cfg, version, seed=i)
    d = _start(tmp / "daemon-0", config)
    outcomes: list[DaemonKillOutcome] = []
    try:
        ask_daemon(cfg, "promote", {"version": versions[0]}, timeout_s=300, pid=None)
        for i, at in enumerate(points, start=1):
            out, d = kill_round(d, cfg, config, versions[i], at=at, where=tmp / f"daemon-{i}")
            outcomes.append(out)
        if d.stop() != 0:
            outcomes[-1].problems.append(f"the last daemon stopped with {d.proc.returncode}")
    finally:
        d.close()
    return outcomes
