"""The plugin's guard and the engine watch against real vLLM CPU servers (issue #12, 4 and 7).

Own servers and state dirs (not the session's), because these tests restart and crash them:

* ``guarded``: the managed server as the daemon runs it. Prompt log-probs requests and LoRA
  requests sent together all answer 200; the client key cannot load, unload or alias
  adapters; pinned names cannot be re-pointed; a SIGKILLed engine is noticed through
  :meth:`ManagedVLLM.check` and vLLM restarted and reconciled; the whole process group
  SIGKILLed idle and in the middle of a swap (``tests/faults/vllm_kills.py``) comes back
  serving the store's current version.
* ``ungated``: the same server with the batch gate off (``EVERGREEN_BATCH_GATE=0``) shows
  the vLLM 0.32 crash the gate prevents, and the daemon recovering from that real crash.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from daemon.config import Config
from daemon.metrics import Metrics
from daemon.serving import promotion
from daemon.serving.engine import engine_pids
from daemon.serving.swap import Swapper
from daemon.serving.vllm import ManagedVLLM
from daemon.serving.vllm_guard import GATE_ENV
from store import events
from store.db import open_db
from tests.faults import audit, vllm_kills
from tests.fixtures_model import make_tiny_cfg
from tests.fixtures_vllm import STARTUP_TIMEOUT_S, make_lora

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

RECOVERY_WAIT_S = 400.0  # a bounded wait: a vLLM start takes 30-120 s on 2 shared cores
ROUNDS = 4
PROMPT = "The quick brown fox jumps over the lazy dog and then " * 4


class Served:
    """One managed server with two adapters, v0001 current, a swapper and metrics."""

    def __init__(self, cfg: Config, server: ManagedVLLM) -> None:
        self.cfg, self.server = cfg, server
        self.metrics = Metrics()
        self.swapper = Swapper(cfg, [server.endpoint])
        server.on_restart.append(self.swapper.reconcile)
        server.on_engine_recovered.append(self.metrics.on_engine_restart)
        self.base = str(cfg.resolved_base_model())
        self.client_headers = {"Authorization": f"Bearer {server.api_key}"}
        self.admin_headers = {**self.client_headers, "X-Evergreen-Admin": server.admin_secret}

    def post(self, path: str, body: Any, *, admin: bool = False) -> httpx.Response:
        headers = self.admin_headers if admin else self.client_headers
        return httpx.post(f"{self.server.url}{path}", json=body, headers=headers, timeout=120)


class UngatedVLLM(ManagedVLLM):
    def environment(self) -> dict[str, str]:
        return {**super().environment(), GATE_ENV: "0"}


def _port() -> int:
    """A free port away from the shared fixtures' 18100-18199 (other sessions may start
    servers there at the same time)."""
    for port in random.sample(range(18300, 18900), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18300-18899")


def _serve(tmp: Path, seed: Path, cls: type[ManagedVLLM]) -> Served:
    cfg = make_tiny_cfg(
        tmp,
        seed,
        serving={
            "port": _port(),
            "max_lora_rank": 16,
            "max_loras": 4,
            "max_model_len": 512,
            "kvcache_space_gib": 1,
        },
    )
    server = cls(cfg)
    server.start()
    if not server.wait_healthy(STARTUP_TIMEOUT_S):
        tail = server.log_tail(40)
        server.stop()
        pytest.fail(f"vLLM did not start: {server.last_error}\n{tail}")
    served = Served(cfg, server)
    for i, version in enumerate(("v0001", "v0002"), start=1):
        make_lora(cfg, version, seed=i)
    promotion.promote(cfg, "v0001", "guard tests", swapper=served.swapper)
    return served


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_seed_model: Path) -> Iterator[Served]:
    served = _serve(tmp_path_factory.mktemp("guarded"), tiny_seed_model, ManagedVLLM)
    try:
        yield served
    finally:
        served.swapper.close()
        served.server.stop()


def the_mix(s: Served) -> list[int | str]:
    """The reproduction: prompt log-probs on the base model and a completion on an adapter,
    sent at the same time. Returns both HTTP statuses (or the error)."""
    plp = {"model": s.base, "prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 1}
    lora = {"model": "evergreen", "prompt": "def main", "max_tokens": 8}
    out: list[int | str] = ["", ""]
    start = threading.Barrier(2)

    def send(i: int, body: dict[str, Any]) -> None:
        start.wait()
        try:
            out[i] = s.post("/v1/completions", body).status_code
        except httpx.HTTPError as exc:
            out[i] = repr(exc)

    threads = [threading.Thread(target=send, args=a) for a in enumerate((plp, lora))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_prompt_logprobs_beside_lora_keeps_the_engine_alive(guarded: Served) -> None:
    ep = guarded.server.endpoint
    for _ in range(ROUNDS):
        assert the_mix(guarded) == [200, 200]
        assert ep.health()
        assert ep.probe(guarded.base, timeout=30)
    # Prompt log-probs are still served, on the base model and on an adapter.
    for model in (guarded.base, "evergreen"):
        body = {"model": model, "prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 1}
        resp = guarded.post("/v1/completions", body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["logprobs"]["token_logprobs"][1] is not None


def _registry(s: Served) -> dict[str, dict[str, str]]:
    return s.server.endpoint.aliases()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "ADAPTERS/v0002"}),
        ("/v1/unload_lora_adapter", {"lora_name": "evergreen-v0001"}),
        ("/v1/unload_lora_adapter", {"lora_name": "evergreen"}),
        ("/v1/evergreen/alias", {"alias": "evergreen", "target": "evergreen-base"}),
        ("/adapters", {"name": "evil", "src": "ADAPTERS/v0002"}),
    ],
)
def test_client_key_cannot_manage_adapters(guarded: Served, path: str, body: dict) -> None:
    body = {k: v.replace("ADAPTERS", str(guarded.cfg.adapters_dir)) for k, v in body.items()}
    before = _registry(guarded)
    assert guarded.post(path, body).status_code == 403
    wrong = {**guarded.client_headers, "X-Evergreen-Admin": "not-the-secret"}
    url = f"{guarded.server.url}{path}"
    assert httpx.post(url, json=body, headers=wrong).status_code == 403
    assert httpx.post(url, json=body).status_code in (401, 403)  # no key at all
    assert _registry(guarded) == before
    assert guarded.server.endpoint.completion("evergreen", "def main", max_tokens=4)


def test_admin_secret_manages_adapters(guarded: Served) -> None:
    v2 = str(guarded.cfg.adapters_dir / "v0002")
    resp = guarded.post(
        "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": v2}, admin=True
    )
    assert resp.status_code == 200, resp.text
    assert _registry(guarded)["extra"]["target"] == "extra"
    resp = guarded.post("/v1/unload_lora_adapter", {"lora_name": "extra"}, admin=True)
    assert resp.status_code == 200, resp.text
    assert "extra" not in _registry(guarded)


def test_pinned_name_cannot_be_repointed(guarded: Served) -> None:
    ep = guarded.server.endpoint
    pinned = ep.completion("evergreen-v0001", "def main", max_tokens=12)
    v1, v2 = (str(guarded.cfg.adapters_dir / v) for v in ("v0001", "v0002"))
    load = "/v1/load_lora_adapter"
    # Loading the pinned name from other weights is refused, even once it is unloaded.
    resp = guarded.post(load, {"lora_name": "evergreen-v0001", "lora_path": v2}, admin=True)
    assert resp.status_code == 409, resp.text
    ep.unload_lora("evergreen-v0001")
    resp = guarded.post(load, {"lora_name": "evergreen-v0001", "lora_path": v2}, admin=True)
    assert resp.status_code == 409, resp.text
    ep.load_lora("evergreen-v0001", v1)  # its own weights: fine
    # Nor can a pinned name become an alias of another version.
    ep.load_lora("evergreen-v0002", v2)
    alias = {"alias": "evergreen-v0001", "target": "evergreen-v0002"}
    resp = guarded.post("/v1/evergreen/alias", alias, admin=True)
    assert resp.status_code == 409, resp.text
    assert _registry(guarded)["evergreen-v0001"]["target"] == "evergreen-v0001"
    assert ep.completion("evergreen-v0001", "def main", max_tokens=12) == pinned
    # The stable name still moves (a swap), and the pinned name still answers as before.
    promotion.promote(guarded.cfg, "v0002", "pinned test", swapper=guarded.swapper)
    assert ep.completion("evergreen-v0001", "def main", max_tokens=12) == pinned
    assert guarded.swapper.reconcile() == {ep.name: "ok"}


def test_failed_load_does_not_bind_a_pinned_name(guarded: Served) -> None:
    """Regression (#12): the guard noted a pinned name's path before vLLM loaded it, so one
    failed load (a wrong path) bound the name to that path and refused the real one."""
    load = "/v1/load_lora_adapter"
    missing = str(guarded.cfg.adapters_dir / "no-such-version")
    resp = guarded.post(load, {"lora_name": "evergreen-v0003", "lora_path": missing}, admin=True)
    assert resp.status_code >= 400, resp.text
    real = str(make_lora(guarded.cfg, "v0003", seed=3, register=False))
    resp = guarded.post(load, {"lora_name": "evergreen-v0003", "lora_path": real}, admin=True)
    assert resp.status_code == 200, resp.text
    # Once loaded, the name is bound to those weights.
    v2 = str(guarded.cfg.adapters_dir / "v0002")
    resp = guarded.post(load, {"lora_name": "evergreen-v0003", "lora_path": v2}, admin=True)
    assert resp.status_code == 409, resp.text
    # ... and serves them (ignore_eos: a tiny model may well answer with EOS first).
    body = {"model": "evergreen-v0003", "prompt": "def main", "max_tokens": 4, "ignore_eos": True}
    resp = guarded.post("/v1/completions", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4


def _engine_events(cfg: Config) -> list[dict]:
    db = open_db(cfg.db_path)
    try:
        return events.recent(db, kind_prefix="vllm.engine_restarted", limit=10)
    finally:
        db.conn.close()


def _check_until_restarted(s: Served) -> float:
    """Call check() as the daemon's loop does until vLLM is back; the seconds it took."""
    started = time.monotonic()
    deadline = started + RECOVERY_WAIT_S
    while time.monotonic() < deadline:
        if s.server.check():
            return time.monotonic() - started
        time.sleep(0.5)
    pytest.fail(f"vLLM not restarted in {RECOVERY_WAIT_S:.0f}s:\n{s.server.log_tail(40)}")


def _assert_recovered(s: Served, want: str, expected: str) -> None:
    ep = s.server.endpoint
    assert s.server.engine_restarts == 1
    assert s.metrics.registry.get_sample_value("evergreen_vllm_engine_restarts_total") == 1
    recovery = s.metrics.registry.get_sample_value("evergreen_vllm_engine_recovery_seconds")
    assert recovery and recovery > 0
    print(f"engine recovery: {recovery:.1f}s")
    assert s.swapper.served_version() == want
    assert ep.completion("evergreen", "def main", max_tokens=12) == expected
    (event,) = _engine_events(s.cfg)
    assert "engine" in event["message"]


def test_killed_engine_is_noticed_and_vllm_restarted(guarded: Served) -> None:
    ep, server = guarded.server.endpoint, guarded.server
    want = guarded.swapper.served_version()
    assert want is not None
    expected = ep.completion("evergreen", "def main", max_tokens=12)
    assert server.proc is not None
    api_pid = server.proc.pid
    (engine,) = engine_pids(api_pid)
    # The model runs in the engine process itself: no worker process under it.
    assert [p.pid for p in psutil.Process(engine).children()] == []
    assert server.check() is False  # up and fine: nothing to do
    os.kill(engine, signal.SIGKILL)
    _check_until_restarted(guarded)
    assert server.proc is not None and server.proc.pid != api_pid
    assert not psutil.pid_exists(api_pid) or psutil.Process(api_pid).status() == "zombie"
    _assert_recovered(guarded, want, expected)


def _current(cfg: Config) -> str | None:
    return audit.current_version(cfg.db_path)


def test_vllm_group_killed_idle_comes_back_serving_the_current_version(guarded: Served) -> None:
    """kill -9 of vLLM's whole process group (API server and engine) while idle."""
    want = _current(guarded.cfg)
    assert want is not None and guarded.server.proc is not None
    pgid = guarded.server.proc.pid
    restarts = guarded.server.restarts
    out = vllm_kills.kill_idle(guarded.server, guarded.swapper, wait_s=RECOVERY_WAIT_S, pace_s=0.5)
    print(out.line())
    assert out.recovered, out.line()
    assert out.served == out.current == want
    assert guarded.swapper.served_version() == want
    assert guarded.server.restarts == restarts + 1
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # nothing of the old group is left


@pytest.mark.parametrize("at", ["load", "flipped"])
def test_vllm_group_killed_mid_swap_serves_what_the_store_says(guarded: Served, at: str) -> None:
    """kill -9 of vLLM's group while a promotion loads the new version (``load``) or right
    after it re-pointed the stable name (``flipped``): the promotion fails, the store keeps
    the version before, and the restarted server serves that one; then the same promotion
    goes through on the recovered server."""
    before = _current(guarded.cfg)
    version = "v0001" if before == "v0002" else "v0002"
    out = vllm_kills.kill_mid_swap(
        guarded.server, guarded.swapper, version, at, wait_s=RECOVERY_WAIT_S, pace_s=0.5
    )
    print(out.line())
    assert out.recovered, out.line()
    assert out.promotion.startswith("failed"), out.promotion
    assert out.served == out.current == before
    assert guarded.swapper.served_version() == before
    ep = guarded.server.endpoint
    promotion.promote(guarded.cfg, version, "after the kill", swapper=guarded.swapper)
    assert _current(guarded.cfg) == version
    pinned = ep.completion(f"evergreen-{version}", "def main", max_tokens=8)
    assert ep.completion("evergreen", "def main", max_tokens=8) == pinned


@pytest.fixture(scope="module")
def ungated(
    tmp_path_factory: pytest.TempPathFactory, tiny_seed_model: Path, guarded: Served
) -> Iterator[Served]:
    guarded.server.stop()  # one vLLM at a time on 2 cores
    served = _serve(tmp_path_factory.mktemp("ungated"), tiny_seed_model, UngatedVLLM)
    try:
        yield served
    finally:
        served.swapper.close()
        served.server.stop()


def test_without_the_gate_the_mix_kills_the_engine_and_the_daemon_recovers(
    ungated: Served,
) -> None:
    """The vLLM bug the gate exists for (if this starts failing, vLLM fixed it), and the
    daemon's recovery from that real crash."""
    ep = ungated.server.endpoint
    expected = ep.completion("evergreen", "def main", max_tokens=12)
    results = []
    for _ in range(5):
        results.append(the_mix(ungated))
        if not ep.probe(ungated.base, timeout=30):
            break
    assert results[-1] != [200, 200], f"the mix no longer kills vLLM's engine: {results}"
    seconds = _check_until_restarted(ungated)
    print(f"crash -> restarted and reconciled: {seconds:.1f}s")
    _assert_recovered(ungated, "v0001", expected)
