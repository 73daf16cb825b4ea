"""The monitoring files in ``deploy/`` work with the real Prometheus 2.42 (Debian's package).

``promtool`` checks the scrape config and the rules and runs ``deploy/alerts_test.yml``
(each alert fires on the series a fault produces, not on healthy ones); a real
``prometheus`` server then scrapes the real daemon on loopback with ``deploy/alerts.yml``
loaded, and sees ``EvergreenDaemonDown`` go pending once the daemon stops.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENSURE = ROOT / "scripts" / "ensure-prometheus.sh"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def prom_bin() -> dict[str, str]:
    """Paths of ``promtool`` and ``prometheus``, installed like ``make test`` does if absent."""
    tools = {name: shutil.which(name) for name in ("promtool", "prometheus")}
    if not all(tools.values()):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip(
                "promtool/prometheus missing and not installable here (needs root and "
                "apt-get): install Debian's 'prometheus' package"
            )
        proc = subprocess.run(["bash", str(ENSURE)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{ENSURE.name} failed:\n{proc.stdout}{proc.stderr}"
        tools = {name: shutil.which(name) for name in tools}
    assert all(tools.values()), f"still missing after {ENSURE.name}: {tools}"
    return {name: str(path) for name, path in tools.items()}


def promtool(prom_bin: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prom_bin["promtool"], *args], capture_output=True, text=True, check=False, timeout=120
    )


def _alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [r for g in data["groups"] for r in g["rules"] if "alert" in r]


# ---------------------------------------------------------------------------- promtool
def test_scrape_config_is_valid(prom_bin: dict[str, str]) -> None:
    proc = promtool(prom_bin, "check", "config", str(DEPLOY / "prometheus.yml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 rule files found" in out, out  # the config really loads alerts.yml


def test_alert_rules_are_valid(prom_bin: dict[str, str]) -> None:
    proc = promtool(prom_bin, "check", "rules", str(DEPLOY / "alerts.yml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"SUCCESS: {len(_alerts())} rules found" in out, out


def test_alerts_fire_on_faults_and_not_on_healthy_series(prom_bin: dict[str, str]) -> None:
    proc = promtool(prom_bin, "test", "rules", str(DEPLOY / "alerts_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_tests_cover_every_alert_both_ways() -> None:
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in _alerts()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


@pytest.mark.parametrize(
    ("expr", "why"), [("vector(0) > 1", "never fires"), ("vector(1)", "always fires")]
)
def test_alert_tests_catch_a_broken_rule(
    prom_bin: dict[str, str], tmp_path: Path, expr: str, why: str
) -> None:
    """Replace every alert's expression: the unit tests must fail for every alert."""
    data = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule["expr"] = expr
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(data))
    shutil.copy(DEPLOY / "alerts_test.yml", tmp_path / "alerts_test.yml")
    proc = promtool(prom_bin, "test", "rules", str(tmp_path / "alerts_test.yml"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"an alert that {why} passed the unit tests:\n{out}"
    for name in {r["alert"] for r in _alerts()}:
        assert f"alertname: {name}," in out, f"{name} that {why} passed its tests:\n{out}"


def _exported_labels() -> dict[str, set[str]]:
    """Every series name the daemon exports -> its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from daemon.metrics import Metrics

    m = Metrics()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    out: dict[str, set[str]] = {}
    for metric in vars(m).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        for suffix in suffixes.get(metric._type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            out[metric._name + suffix] = labels | extra
    return out


def test_alert_tests_use_the_daemons_series() -> None:
    """The unit tests' input series have the daemon's exact names and label names."""
    exported = _exported_labels()
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    series = [s["series"] for case in tests for s in case["input_series"]]
    added_by_scrape = {"job", "instance"}
    for text in series:
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", text)
        assert match, text
        name, labels = match[1], set(re.findall(r'([a-zA-Z_]+)="', match[2]))
        assert labels >= added_by_scrape, text
        if name == "up":  # Prometheus' own series for the scrape
            assert labels == added_by_scrape, text
            continue
        assert name in exported, f"{name} is not exported by daemon/metrics.py"
        assert labels - added_by_scrape == exported[name], text


# ---------------------------------------------------------------------------- live scrape
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
        )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL; returns the exit status and leaves no child behind."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()
    assert not alive, f"{proc.args[0]} left children behind: {alive}"
    return int(proc.returncode)


def _wait(what: str, predicate: Callable[[], Any], *logs: Path) -> Any:
    deadline = time.monotonic() + WAIT_S
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    raise AssertionError(f"no {what} within {WAIT_S:.0f} s (last: {last!r})\n{tails}")


@pytest.fixture
def daemon_cfg(tmp_path: Path, tiny_seed_model: Path) -> tuple[Path, int]:
    """A cheap daemon: tiny seed model already built, no vLLM, no warm stage process."""
    port = free_port()
    cfg = tmp_path / "evergreen.toml"
    cfg.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
inbox_dir = "{tmp_path / "inbox"}"
base_model = "{tiny_seed_model}"
stop_grace_s = 10.0

[seed]
size = "tiny"

[training]
prewarm = false

[serving]
mode = "none"

[metrics]
host = "127.0.0.1"
port = {port}
""",
        encoding="utf-8",
    )
    return cfg, port


def prometheus_config(path: Path, daemon_port: int) -> None:
    """deploy/prometheus.yml's evergreen job and alerts, pointed at the test daemon, 1 s pace."""
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(DEPLOY / rule) for rule in cfg["rule_files"]]
    jobs = [job for job in cfg["scrape_configs"] if job["job_name"] == "evergreen"]
    assert jobs, "deploy/prometheus.yml has no job 'evergreen' (EvergreenDaemonDown needs it)"
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{daemon_port}"]}]
    cfg["scrape_configs"] = jobs  # not the vLLM job: port 8000 may be someone else's here
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; whatever it did not stop itself is stopped here."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        if proc.poll() is None:
            _stop(proc)


def test_real_prometheus_scrapes_the_daemon(
    prom_bin: dict[str, str],
    daemon_cfg: tuple[Path, int],
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    cfg, daemon_port = daemon_cfg
    daemon_log, prom_log = tmp_path / "daemon.log", tmp_path / "prometheus.log"
    daemon = _start([sys.executable, "-m", "daemon", "--config", str(cfg), "run"], daemon_log)
    procs.append(daemon)

    prom_port = free_port()
    prometheus_config(tmp_path / "prometheus.yml", daemon_port)
    prom = _start(
        [
            prom_bin["prometheus"],
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        prom_log,
    )
    procs.append(prom)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    logs = (daemon_log, prom_log)

    def query(expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{api}/query", params={"query": expr}, timeout=5).json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def running() -> bool:
        for proc, log in ((daemon, daemon_log), (prom, prom_log)):
            tail = log.read_text(errors="replace")[-3000:]
            assert proc.poll() is None, f"{log.stem} exited ({proc.returncode}):\n{tail}"
        return True

    # The target is up and the daemon's own series arrived through the scrape.
    _wait("up == 1", lambda: running() and query('up{job="evergreen"} == 1'), *logs)
    _wait(
        "a loop heartbeat",
        lambda: running() and query("evergreen_loop_heartbeat_timestamp_seconds > 0"),
        *logs,
    )
    targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("evergreen", "up")]
    build = query("evergreen_build_info")
    assert len(build) == 1 and build[0]["metric"]["job"] == "evergreen", build

    # Every shipped rule evaluates without error on the real scrape...
    def rules_evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if rules and done else []

    rules = _wait("an evaluation of every rule", rules_evaluated, *logs)
    assert {r["name"] for r in rules} == {r["alert"] for r in _alerts()}
    assert [
        (r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"
    ] == []
    # ...and the daemon-down condition is false on the healthy daemon.
    down_expr = next(r["expr"] for r in _alerts() if r["alert"] == "EvergreenDaemonDown")
    assert query(down_expr) == []

    # A stopped daemon: the real scrape fails and EvergreenDaemonDown goes pending.
    assert _stop(daemon) == 0, daemon_log.read_text(errors="replace")[-3000:]

    def daemon_down_alert() -> list[dict[str, Any]]:
        alerts = httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "EvergreenDaemonDown"]

    alerts = _wait("EvergreenDaemonDown pending", daemon_down_alert, *logs)
    assert [a["state"] for a in alerts] == ["pending"]  # for: 5m
    assert alerts[0]["labels"]["instance"] == f"127.0.0.1:{daemon_port}"
    assert query('up{job="evergreen"}')[0]["value"][1] == "0"

    assert _stop(prom) == 0, prom_log.read_text(errors="replace")[-3000:]
