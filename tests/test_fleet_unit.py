"""The replica fleet without vLLM: endpoints from config, DNS and a reload; swaps over the
replicas that are up; reconcile of a replica that returns or joins; metrics and status.

The replicas are fake vLLM servers on loopback (``tests/fake_replica.py``: the routes
the swapper calls, nothing else) on 127.0.0.1, .2 and .3, one port; the resolver is a
function the test controls (DNS is the network beyond loopback). The store is real.
``tests/test_fleet.py`` runs the same paths on three real vLLM servers.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest

from daemon import config as config_mod
from daemon.config import Config, ConfigError
from daemon.metrics import Metrics
from daemon.serving import promotion
from daemon.serving.apikey import load_or_create_admin_secret
from daemon.serving.swap import SwapError, Swapper
from daemon.status import collect, replicas_line
from store import adapters, events
from store.db import open_db
from tests.fake_replica import FakeReplica, write_adapter_files
from tests.harness import free_port, scrape, to_toml

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def shared_port() -> int:
    """A port free on all three loopback addresses."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = int(s.getsockname()[1])
        try:
            for host in HOSTS[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on 127.0.0.1-3")


class Resolver:
    """A DNS the test edits: ``answer`` is what ``fleet.test`` resolves to now."""

    def __init__(self, answer: list[str]) -> None:
        self.answer = answer
        self.fail = False
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if self.fail:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        assert host == "fleet.test"
        return list(self.answer)


def make_cfg(tmp_path: Path, port: int, **serving: object) -> Config:
    cfg = config_mod.from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "serving": {"mode": "external", "reconcile_interval_s": 1.0, **serving},
        }
    )
    write_adapter_files(cfg.serving_dir / "zero-adapter")  # the base stand-in, without torch
    db = open_db(cfg.db_path)
    try:
        for version in ("v0001", "v0002"):
            path = write_adapter_files(cfg.adapters_dir / version)
            adapters.register(db, version, str(path), track=cfg.track)
    finally:
        db.conn.close()
    return cfg


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Config, list[FakeReplica], Resolver]]:
    port = shared_port()
    cfg = make_cfg(tmp_path, port, endpoints_dns=[f"fleet.test:{port}"])
    secret = load_or_create_admin_secret(cfg)
    replicas = [FakeReplica(h, port, secret=secret).start() for h in HOSTS]
    try:
        yield cfg, replicas, Resolver(list(HOSTS))
    finally:
        for r in replicas:
            r.stop()


def stable_path(replica: FakeReplica) -> str | None:
    return replica.serving("evergreen")


def version_dir(cfg: Config, version: str) -> str:
    return str((cfg.adapters_dir / version).resolve())


def current(cfg: Config) -> str | None:
    db = open_db(cfg.db_path)
    try:
        return adapters.current(db, cfg.track)
    finally:
        db.conn.close()


def test_swap_skips_a_down_replica_and_reconcile_brings_it_back(fleet) -> None:
    cfg, replicas, resolve = fleet
    sw = Swapper.from_config(cfg, resolve=resolve)
    try:
        assert [ep.name for ep in sw.endpoints] == [f"{h}:{replicas[0].port}" for h in HOSTS]
        assert set(sw.reconcile().values()) == {"restored"}  # all three to the base stand-in
        replicas[2].stop()
        done = promotion.promote(cfg, "v0001", "test", swapper=sw)
        assert done.swap is not None and done.swap.skipped == [sw.endpoints[2].name]
        assert "2 of 3 endpoint(s)" in done.message
        assert current(cfg) == "v0001"
        assert [stable_path(r) for r in replicas[:2]] == [version_dir(cfg, "v0001")] * 2
        assert sw.served_version() == "v0001"  # over the replicas that are up
        replicas[2].start()  # back, empty, like a restarted vLLM
        outcome = sw.reconcile()
        assert outcome[sw.endpoints[2].name] == "restored"
        assert stable_path(replicas[2]) == version_dir(cfg, "v0001")
        assert sw.reconcile() == {ep.name: "ok" for ep in sw.endpoints}
        for r in replicas:
            r.stop()
        # none up (vLLM restarting, the fleet down): a valid version still becomes current
        # (a gate-passed candidate is not thrown away) and the reconcile serves it later
        done = promotion.promote(cfg, "v0002", "test", swapper=sw)
        assert done.swap is None and "no endpoint is up" in done.message
        assert current(cfg) == "v0002"
        for r in replicas:
            r.start()
        assert sw.reconcile() == {ep.name: "restored" for ep in sw.endpoints}
        assert [stable_path(r) for r in replicas] == [version_dir(cfg, "v0002")] * 3
        for r in replicas:
            r.stop()
        # ... but an invalid one is refused before health is even asked
        (Path(version_dir(cfg, "v0001")) / "adapter_model.safetensors").write_bytes(b"x")
        with pytest.raises(SwapError, match="failed at validate"):
            promotion.promote(cfg, "v0001", "test", swapper=sw)
        assert current(cfg) == "v0002"
    finally:
        sw.close()


def test_a_replica_that_refuses_fails_the_swap_on_all(fleet) -> None:
    cfg, replicas, resolve = fleet
    sw = Swapper.from_config(cfg, resolve=resolve)
    try:
        promotion.promote(cfg, "v0001", "test", swapper=sw)
        replicas[1].secret = "another secret"  # its plugin refuses this daemon's loads
        with pytest.raises(SwapError, match="failed at load"):
            promotion.promote(cfg, "v0002", "test", swapper=sw)
        assert current(cfg) == "v0001"
        assert [stable_path(r) for r in replicas] == [version_dir(cfg, "v0001")] * 3
        assert all(r.serving("evergreen-v0002") is None for r in replicas)  # loads undone
    finally:
        sw.close()


def test_dns_changes_join_and_leave_at_the_next_reconcile(fleet) -> None:
    cfg, replicas, resolve = fleet
    resolve.answer = [HOSTS[0]]
    sw = Swapper.from_config(cfg, resolve=resolve)
    try:
        promotion.promote(cfg, "v0001", "test", swapper=sw)
        assert stable_path(replicas[1]) is None
        resolve.answer = [HOSTS[0], HOSTS[1]]
        name1 = f"{HOSTS[1]}:{replicas[1].port}"
        assert sw.reconcile() == {sw.endpoints[0].name: "ok", name1: "restored"}
        assert stable_path(replicas[1]) == version_dir(cfg, "v0001")
        resolve.fail = True  # a DNS outage keeps the last answer
        assert set(sw.reconcile()) == {sw.endpoints[0].name, name1}
        resolve.fail = False
        resolve.answer = [HOSTS[1]]
        assert sw.reconcile() == {name1: "ok"}
        db = open_db(cfg.db_path)
        try:
            changes = events.recent(db, kind_prefix="serving.fleet_changed", limit=5)
        finally:
            db.conn.close()
        assert [e["message"] for e in changes][:2] == [
            f"left: {HOSTS[0]}:{replicas[0].port}",
            f"joined: {name1}",
        ]
    finally:
        sw.close()


def test_reload_takes_new_endpoints_and_keeps_them_on_a_bad_file(fleet, tmp_path) -> None:
    cfg, replicas, _ = fleet
    port = replicas[0].port
    static = cfg.model_copy(
        update={
            "serving": cfg.serving.model_copy(
                update={"endpoints_dns": [], "endpoints": [f"http://{HOSTS[0]}:{port}"]}
            )
        }
    )
    sw = Swapper.from_config(static)
    try:
        promotion.promote(static, "v0001", "test", swapper=sw)
        assert sw.fleet is not None

        def bad() -> Config:
            raise ConfigError("serving.endpoints", "must be a list")

        sw.fleet.request_reload(bad)
        assert len(sw.reconcile()) == 1
        new = static.serving.model_copy(
            update={"endpoints": [f"http://{h}:{port}" for h in HOSTS[:2]], "port": 9}
        )
        sw.fleet.request_reload(lambda: static.model_copy(update={"serving": new}))
        assert list(sw.reconcile().values()) == ["ok", "restored"]
        assert stable_path(replicas[1]) == version_dir(cfg, "v0001")
        assert sw.fleet.serving.port == static.serving.port  # only the endpoint keys reload
    finally:
        sw.close()


def test_metrics_and_status_show_each_replica(fleet) -> None:
    cfg, replicas, resolve = fleet
    sw = Swapper.from_config(cfg, resolve=resolve)
    metrics = Metrics()
    try:
        promotion.promote(cfg, "v0001", "test", swapper=sw)
        replicas[2].stop()
        sw.reconcile()
        metrics.set_replicas(sw.replica_rows(), "v0001")
        text = generate_latest(metrics.registry).decode()
        n0, n2 = sw.endpoints[0].name, sw.endpoints[2].name
        assert f'evergreen_replica_up{{endpoint="{n0}"}} 1.0' in text
        assert f'evergreen_replica_up{{endpoint="{n2}"}} 0.0' in text
        assert f'evergreen_replica_version_info{{endpoint="{n0}",version="v0001"}} 1.0' in text
        assert f'endpoint="{n2}",version=' not in text
        assert "evergreen_replicas_in_line 2.0" in text
        data = collect(cfg)
        assert [r["endpoint"] for r in data["replicas"]] == [ep.name for ep in sw.endpoints]
        assert (
            replicas_line(data["replicas"], "v0001") == f"3 replica(s): 2 serve v0001; down: {n2}"
        )
        resolve.answer = list(HOSTS[:2])  # the down replica leaves DNS: its series go
        sw.reconcile()
        metrics.set_replicas(sw.replica_rows(), "v0001")
        text = generate_latest(metrics.registry).decode()
        assert n2 not in text
    finally:
        sw.close()


def test_endpoints_dns_needs_a_port() -> None:
    with pytest.raises(ConfigError, match=r"serving\.endpoints_dns"):
        config_mod.from_dict({"serving": {"endpoints_dns": ["vllm.internal"]}})
    ok = config_mod.from_dict({"serving": {"endpoints_dns": ["https://vllm.internal:8443"]}})
    assert ok.serving.endpoints_dns == ["https://vllm.internal:8443"]


def test_sighup_to_the_daemon_adds_a_replica(tmp_path: Path) -> None:
    """`evergreen serve` (external mode, a real daemon process): a replica added to the
    config file joins on SIGHUP, is served the current adapter, and shows in /metrics."""
    port, metrics_port = shared_port(), free_port()
    cfg = make_cfg(tmp_path, port)
    secret = load_or_create_admin_secret(cfg)
    replicas = [FakeReplica(h, port, secret=secret).start() for h in HOSTS[:2]]
    conf = tmp_path / "evergreen.toml"

    def write(urls: list[str]) -> None:
        serving = {"mode": "external", "endpoints": urls, "reconcile_interval_s": 0.5}
        data = {"state_dir": cfg.state_dir, "serving": serving, "metrics": {"port": metrics_port}}
        conf.write_text(to_toml(data), encoding="utf-8")

    write([replicas[0].url])
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(conf), "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    zero = str(cfg.serving_dir.joinpath("zero-adapter").resolve())
    try:
        wait_until(lambda: stable_path(replicas[0]) == zero, proc, tmp_path)
        write([r.url for r in replicas])
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: stable_path(replicas[1]) == zero, proc, tmp_path)
        name1 = f"{HOSTS[1]}:{port}"
        wait_until(
            lambda: (
                scrape(url).get(f"evergreen_replica_version_info{{endpoint={name1},version=base}}")
                == 1
            ),
            proc,
            tmp_path,
        )
        assert scrape(url)["evergreen_replicas_in_line"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
        for r in replicas:
            r.stop()
    assert code == 0, (tmp_path / "daemon.log").read_text()
    assert "config reloaded" in (tmp_path / "daemon.log").read_text()


def wait_until(predicate: Callable[[], bool], proc: subprocess.Popen, tmp: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"daemon exited: {(tmp / 'daemon.log').read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return
        time.sleep(0.1)
    pytest.fail(f"condition not met in 30 s: {(tmp / 'daemon.log').read_text()[-3000:]}")


def test_status_shows_the_fleet_only_when_there_is_one_or_it_is_out_of_line(tmp_path) -> None:
    from rich.console import Console

    from daemon.status import render

    cfg = config_mod.from_dict({"state_dir": str(tmp_path / "state")})
    data = collect(cfg)

    def text(rows: list[dict]) -> str:
        console = Console(record=True, width=200)
        render({**data, "current_adapter": "v0002", "replicas": rows}, console)
        return console.export_text()

    one = {"endpoint": "a:1", "up": True, "serving": "v0002"}
    assert "replica" not in text([one])  # one managed server in line: nothing to say
    down = {"endpoint": "b:1", "up": False, "serving": None}
    behind = {"endpoint": "c:1", "up": True, "serving": "v0001"}
    line = text([one, down, behind])
    assert "3 replica(s): 1 serve v0002; down: b:1; behind: c:1 (v0001)" in line
