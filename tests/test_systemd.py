"""The unit files pass ``systemd-analyze verify`` and carry the settings the issue names."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / name)
    return parser


def test_units_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is required (make test installs Debian's systemd)"
    # The units point at /opt/evergreen; verify checks that ExecStart exists, so point
    # them at this checkout (whose .venv has the same layout).
    copies = []
    for unit in UNITS:
        text = unit.read_text().replace("/opt/evergreen", str(ROOT))
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(str(copy))
    proc = subprocess.run([exe, "verify", *copies], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_main_unit_settings() -> None:
    u = _unit("evergreen.service")
    svc = u["Service"]
    assert svc["Type"] == "notify"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert "StartLimitBurst" in u["Unit"] and "StartLimitIntervalSec" in u["Unit"]
    assert svc["User"] == "evergreen" and svc["StateDirectory"] == "evergreen"
    assert svc["ProtectSystem"] == "strict" and "ReadWritePaths" in svc
    assert svc["NoNewPrivileges"] == "yes" and svc["PrivateTmp"] == "yes"
    assert svc["ProtectHome"] == "yes"


def test_stop_timeout_covers_grace_period() -> None:
    from daemon.config import Config

    timeout = int(_unit("evergreen.service")["Service"]["TimeoutStopSec"])
    assert timeout > Config().stop_grace_s + 10  # room for vLLM shutdown after the stage


def test_vllm_unit_settings() -> None:
    svc = _unit("evergreen-vllm.service")["Service"]
    assert svc["Type"] == "exec"
    assert "/health" in svc["ExecStartPost"]
    assert int(svc["TimeoutStartSec"]) >= 300
    assert "vllm.entrypoints.openai.api_server" in svc["ExecStart"]
    # serving wins a contested CPU against the daemon's unit (placement)
    main = _unit("evergreen.service")["Service"]
    assert int(svc["CPUWeight"]) > int(main["CPUWeight"]) and int(svc["Nice"]) < 0


@pytest.mark.parametrize("name", ["prometheus.yml", "alerts.yml", "grafana-dashboard.json"])
def test_monitoring_files_exist(name: str) -> None:
    assert (ROOT / "deploy" / name).stat().st_size > 100


def _exported_names() -> set[str]:
    from daemon.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        # Labelled series without children have no samples yet: count the family itself.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_alerts_and_dashboard_use_exported_metrics() -> None:
    import json
    import re

    import yaml

    exported = _exported_names()
    alerts = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    assert {r["alert"] for g in alerts["groups"] for r in g["rules"]} >= {
        "EvergreenModelStale",
        "EvergreenStageFailures",
        "EvergreenVLLMDown",
        "EvergreenQuarantineSpike",
    }
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for expr in exprs:
        for name in re.findall(r"evergreen_[a-z_]+", expr):
            assert name in exported, f"{name} in {expr!r} is not exported"
