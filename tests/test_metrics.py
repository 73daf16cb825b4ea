"""Metric definitions follow the conventions, and the HTTP endpoints behave."""

from __future__ import annotations

import json
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import QUARANTINE_REASONS, Metrics, endpoint_label, serve_http
from store.contracts import StageResult


def _scrape(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_names_follow_conventions() -> None:
    m = Metrics()
    for family in m.registry.collect():
        assert family.name.startswith("evergreen_"), family.name
        if family.type == "counter":
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                assert sample.name.endswith("_total"), sample.name
        for sample in family.samples:
            assert "path" not in sample.labels and "document" not in sample.labels


def test_known_series_start_at_zero_and_move() -> None:
    m = Metrics()
    port = _free_port()
    healthy = {"ok": True}
    server, _ = serve_http(
        m, "127.0.0.1", port, healthy=lambda: healthy["ok"], status=lambda: {"hello": 1}
    )
    try:
        base = f"http://127.0.0.1:{port}"
        values = _scrape(httpx.get(f"{base}/metrics").text)
        assert values["evergreen_stages_total{outcome=promoted}"] == 0
        for reason in QUARANTINE_REASONS:
            assert values[f"evergreen_documents_quarantined_total{{reason={reason}}}"] == 0
        build = [k for k in values if k.startswith("evergreen_build_info")]
        assert len(build) == 1 and "{version=0.1.0}" in build[0] and values[build[0]] == 1

        m.on_ingest_outcome("ingested")
        m.on_ingest_outcome("quarantined", "too_large")
        m.on_stage_finished(
            StageResult(
                status="promoted",
                metrics={
                    "candidate": {"new_loss": 1.5, "retention_loss": 2.2, "general_loss": 3.0},
                    "baseline": {"retention_loss": 2.0},
                },
            ),
            duration_s=42.0,
            finished_at=1000.0,
        )
        m.set_adapter("v0001")
        m.set_adapter("v0002")
        m.on_swap(0.3, True, 2000.0)
        values = _scrape(httpx.get(f"{base}/metrics").text)
        assert values["evergreen_documents_seen_total"] == 2
        assert values["evergreen_documents_ingested_total"] == 1
        assert values["evergreen_documents_quarantined_total{reason=too_large}"] == 1
        assert values["evergreen_stages_total{outcome=promoted}"] == 1
        assert values["evergreen_stage_duration_seconds_count"] == 1
        assert values["evergreen_eval_loss{set=new}"] == 1.5
        assert abs(values["evergreen_forgetting_ratio"] - 1.1) < 1e-9
        assert values["evergreen_last_stage_success_timestamp_seconds"] == 1000.0
        assert values["evergreen_last_swap_timestamp_seconds"] == 2000.0
        assert values["evergreen_adapter_info{version=v0002}"] == 1
        assert "evergreen_adapter_info{version=v0001}" not in values

        assert httpx.get(f"{base}/healthz").status_code == 200
        healthy["ok"] = False
        assert httpx.get(f"{base}/healthz").status_code == 503
        assert json.loads(httpx.get(f"{base}/status").text) == {"hello": 1}
        assert httpx.get(f"{base}/nope").status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_endpoint_label_has_no_credentials() -> None:
    assert endpoint_label("http://user:pw@10.0.0.5:8000/v1") == "10.0.0.5:8000"
    assert endpoint_label("http://127.0.0.1:8000") == "127.0.0.1:8000"
