"""A fleet of three real vLLM CPU servers behind the daemon's serving loop (external mode).

The servers run on 127.0.0.1, 127.0.0.2 and 127.0.0.3, one port, each from its own state dir
holding the daemon's admin secret (what ``EVERGREEN_ADMIN_SECRET_FILE`` gives an external
server). The daemon (:class:`Service` with ``training=False``, its real main loop in a thread)
finds them through ``serving.endpoints_dns = ["fleet.test:PORT"]``; the resolver is the
test's (DNS is the one thing faked), and the third server joins through a config reload
(what SIGHUP does). In order: a replica added to the config gets the current adapter within a
reconcile interval; a swap reaches all three; one killed during a swap is skipped, and once
restarted (empty, like any restarted vLLM) gets the current adapter back within an interval.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from daemon import config as config_mod
from daemon.config import Config
from daemon.private_files import write_private
from daemon.service import Service
from daemon.serving.apikey import admin_secret_path, load_or_create_admin_secret
from daemon.serving.client import VLLMClient
from daemon.serving.vllm import ManagedVLLM
from tests.fixtures_model import make_tiny_cfg
from tests.fixtures_vllm import STARTUP_TIMEOUT_S, make_lora
from tests.test_fleet_unit import HOSTS, Resolver, shared_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

INTERVAL_S = 4.0  # serving.reconcile_interval_s of the daemon under test
API_KEY = "fleet-test-key"
SERVER = {"max_lora_rank": 8, "max_loras": 2, "max_model_len": 256, "api_key": API_KEY}


def start_all(servers: list[ManagedVLLM]) -> None:
    for s in servers:
        s.start()
    with ThreadPoolExecutor(len(servers)) as pool:
        healthy = list(pool.map(lambda s: s.wait_healthy(STARTUP_TIMEOUT_S), servers))
    for s, ok in zip(servers, healthy, strict=True):
        if not ok:
            pytest.fail(f"vLLM on {s.url} did not start: {s.last_error}\n{s.log_tail(30)}")


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, tiny_seed_model: Path
) -> Iterator[tuple[Config, list[ManagedVLLM]]]:
    port = shared_port()
    daemon_state = tmp_path_factory.mktemp("fleet-daemon")
    cfg = make_tiny_cfg(
        daemon_state,
        tiny_seed_model,
        serving={
            "mode": "external",
            "endpoints_dns": [f"fleet.test:{port}"],
            "reconcile_interval_s": INTERVAL_S,
            **SERVER,
        },
        training={"lora_rank": 8},
        metrics={"enabled": False},
    )
    secret = load_or_create_admin_secret(cfg)
    servers = []
    for host in HOSTS:
        state = tmp_path_factory.mktemp(f"fleet-{host}")
        server_cfg = make_tiny_cfg(
            state,
            tiny_seed_model,
            serving={"host": host, "port": port, **SERVER},
            training={"lora_rank": 8},
        )
        write_private(admin_secret_path(server_cfg), secret)
        servers.append(ManagedVLLM(server_cfg))
    try:
        start_all(servers)
        yield cfg, servers
    finally:
        for s in servers:
            s.stop()


def stable_output(server: ManagedVLLM, model: str = "evergreen") -> str:
    ep = VLLMClient(server.url, API_KEY)
    try:
        return ep.completion(model, "def main", max_tokens=12)
    finally:
        ep.close()


def wait_serving(service: Service, name: str, version: str, timeout: float) -> float:
    """Seconds until the daemon's swapper saw ``name`` serve ``version`` (fails after
    ``timeout``)."""
    assert service.swapper is not None
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        st = service.swapper.states.get(name)
        if st is not None and st.up and st.serving == version:
            return time.monotonic() - start
        time.sleep(0.2)
    pytest.fail(f"{name} did not serve {version} within {timeout:.0f} s")


def test_fleet_follows_the_store(fleet: tuple[Config, list[ManagedVLLM]], tmp_path: Path) -> None:
    cfg, servers = fleet
    names = [f"{h}:{cfg.serving.endpoints_dns[0].rsplit(':', 1)[1]}" for h in HOSTS]
    resolve = Resolver(list(HOSTS[:2]))  # the third server is not in DNS
    service = Service(cfg, training=False, resolve=resolve)
    stop = threading.Event()
    service.start()
    loop = threading.Thread(target=service.loop, args=(stop.is_set,), daemon=True)
    loop.start()
    try:
        sw = service.swapper
        assert sw is not None and [ep.name for ep in sw.endpoints] == names[:2]
        make_lora(cfg, "v0001", seed=1, rank=8)
        service.promote("v0001", "fleet test")
        want1 = stable_output(servers[0], "evergreen-v0001")
        assert [stable_output(s) for s in servers[:2]] == [want1, want1]

        # Added to the config file, re-read as on SIGHUP: in line within one interval.
        conf = tmp_path / "evergreen.toml"
        conf.write_text(config_mod.to_toml(cfg), encoding="utf-8")
        extra = config_mod.load(conf).serving.model_copy(update={"endpoints": [servers[2].url]})
        conf.write_text(
            config_mod.to_toml(cfg.model_copy(update={"serving": extra})), encoding="utf-8"
        )
        assert sw.fleet is not None
        sw.fleet.request_reload(lambda: config_mod.load(conf))
        joined_s = wait_serving(service, names[2], "v0001", INTERVAL_S + 60)
        assert stable_output(servers[2]) == want1

        # A swap reaches all three.
        make_lora(cfg, "v0002", seed=2, rank=8)
        service.promote("v0002", "fleet test")
        want2 = stable_output(servers[0], "evergreen-v0002")
        assert want2 != want1
        assert [stable_output(s) for s in servers] == [want2] * 3
        text = generate_latest(service.metrics.registry).decode()
        for name in names:
            assert f'evergreen_replica_version_info{{endpoint="{name}",version="v0002"}}' in text
        assert "evergreen_replicas_in_line 3.0" in text

        # One killed: the next swap goes to the two that are up; restarted, it catches up.
        assert servers[2].proc is not None
        os.killpg(servers[2].proc.pid, signal.SIGKILL)
        servers[2].proc.wait(30)
        make_lora(cfg, "v0003", seed=3, rank=8)
        done = service.promote("v0003", "fleet test, one down")
        assert done.swap is not None and done.swap.skipped == [names[2]]
        want3 = stable_output(servers[0], "evergreen-v0003")
        assert [stable_output(s) for s in servers[:2]] == [want3, want3]
        start_all([servers[2]])
        back_s = wait_serving(service, names[2], "v0003", INTERVAL_S + 60)
        assert stable_output(servers[2]) == want3
        print(f"joined in {joined_s:.1f} s, restarted replica back in line in {back_s:.1f} s")
        assert joined_s <= INTERVAL_S + 30 and back_s <= INTERVAL_S + 30
    finally:
        stop.set()
        loop.join(30)
        service.stop(5)
