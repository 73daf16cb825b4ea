"""Every Prometheus metric Evergreen exports, defined in one place.

Conventions (see DESIGN.md): names start with ``evergreen_``, base units, counters end in
``_total``, labels have low cardinality (never a path or a document id), known series are
initialised to 0 so dashboards and alerts see them before the first event. Each daemon
gets its own registry (tests run several); trainer subprocesses report through the parent
(progress lines and the store), never through prometheus multiprocess mode.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from daemon import __version__
from store.contracts import StageResult

log = logging.getLogger(__name__)

QUARANTINE_REASONS = (
    "too_large",
    "undecodable",
    "malformed_jsonl",
    "broken_pdf",
    "empty",
    "too_short",
    "garbage",
    "outside_inbox",
    "unreadable",
    "unsupported",
)
STAGE_OUTCOMES = ("promoted", "rejected", "failed")
EVAL_SETS = ("new", "retention", "general")
SWAP_OUTCOMES = ("ok", "failed")


class Metrics:
    """The daemon's metrics; methods are the only way the rest of the code touches them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "evergreen_build_info",
            "Build information (always 1).",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self._define_ingest(r)
        self._define_stages(r)
        self._define_serving(r)
        self.loop_heartbeat = Gauge(
            "evergreen_loop_heartbeat_timestamp_seconds",
            "Last main-loop iteration (for liveness).",
            registry=r,
        )
        self._adapter_version: str | None = None
        self._replica_series: dict[str, str | None] = {}  # endpoint -> version label set
        self._lock = threading.Lock()

    def _define_ingest(self, r: CollectorRegistry) -> None:
        self.documents_seen = Counter(
            "evergreen_documents_seen_total", "Files seen in the inbox (any outcome).", registry=r
        )
        self.documents_ingested = Counter(
            "evergreen_documents_ingested_total", "Documents ingested (new content).", registry=r
        )
        self.documents_duplicate = Counter(
            "evergreen_documents_duplicate_total",
            "Files whose content was already stored (stored once).",
            registry=r,
        )
        self.documents_quarantined = Counter(
            "evergreen_documents_quarantined_total",
            "Files quarantined, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in QUARANTINE_REASONS:
            self.documents_quarantined.labels(reason)
        self.pending_tokens = Gauge(
            "evergreen_pending_tokens", "Tokens ingested but not yet trained.", registry=r
        )
        self.staleness = Gauge(
            "evergreen_model_staleness_seconds",
            "Age of the oldest document not yet in the served model (0 = fresh).",
            registry=r,
        )
        self.inbox_unreadable_dirs = Gauge(
            "evergreen_inbox_unreadable_dirs",
            "Inbox folders the last scan could not list (their files are not ingested).",
            registry=r,
        )

    def _define_stages(self, r: CollectorRegistry) -> None:
        self.stages = Counter(
            "evergreen_stages_total", "Finished stages, by outcome.", ["outcome"], registry=r
        )
        for outcome in STAGE_OUTCOMES:
            self.stages.labels(outcome)
        self.stage_running = Gauge("evergreen_stage_running", "1 while a stage runs.", registry=r)
        self.stage_duration = Histogram(
            "evergreen_stage_duration_seconds",
            "Wall time of a stage (train + eval).",
            buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
            registry=r,
        )
        self.train_tokens_per_second = Gauge(
            "evergreen_training_tokens_per_second",
            "Throughput of the running/last stage.",
            registry=r,
        )
        self.stage_progress_ratio = Gauge(
            "evergreen_stage_progress_ratio",
            "Running stage: optimizer steps done / planned (0 when no stage runs).",
            registry=r,
        )
        self.stage_tokens_per_second = Gauge(
            "evergreen_stage_tokens_per_second",
            "Running stage: current training throughput (0 when no stage runs).",
            registry=r,
        )
        self.eval_loss = Gauge(
            "evergreen_eval_loss", "Last stage's candidate loss, by set.", ["set"], registry=r
        )
        for name in EVAL_SETS:
            self.eval_loss.labels(name)
        self.forgetting_ratio = Gauge(
            "evergreen_forgetting_ratio",
            "Last stage: candidate retention loss / parent retention loss (>1 = forgetting).",
            registry=r,
        )
        self.last_stage_success = Gauge(
            "evergreen_last_stage_success_timestamp_seconds",
            "Unix time of the last promoted stage.",
            registry=r,
        )

    def _define_serving(self, r: CollectorRegistry) -> None:
        self.swap_duration = Histogram(
            "evergreen_swap_duration_seconds",
            "Wall time of a hot swap on all endpoints.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.swaps = Counter(
            "evergreen_swaps_total", "Hot swaps, by outcome.", ["outcome"], registry=r
        )
        for outcome in SWAP_OUTCOMES:
            self.swaps.labels(outcome)
        self.last_swap = Gauge(
            "evergreen_last_swap_timestamp_seconds",
            "Unix time of the last successful swap.",
            registry=r,
        )
        self.adapter_info = Gauge(
            "evergreen_adapter_info",
            "The adapter version currently served (value 1).",
            ["version"],
            registry=r,
        )
        self.vllm_up = Gauge(
            "evergreen_vllm_up", "1 if the vLLM endpoint answers /health.", ["endpoint"], registry=r
        )
        self.replica_up = Gauge(
            "evergreen_replica_up",
            "1 if the replica (one vLLM endpoint of the fleet) answers /health.",
            ["endpoint"],
            registry=r,
        )
        self.replica_version = Gauge(
            "evergreen_replica_version_info",
            "The adapter version the replica's stable name serves (value 1; none while down"
            " or unknown).",
            ["endpoint", "version"],
            registry=r,
        )
        self.replicas_in_line = Gauge(
            "evergreen_replicas_in_line",
            "Replicas that are up and serve the current adapter.",
            registry=r,
        )
        self.vllm_engine_restarts = Counter(
            "evergreen_vllm_engine_restarts_total",
            "Managed vLLM restarts because its engine died (the API server may have lived).",
            registry=r,
        )
        self.vllm_engine_recovery = Gauge(
            "evergreen_vllm_engine_recovery_seconds",
            "Last engine recovery: engine death noticed -> vLLM restarted and reconciled.",
            registry=r,
        )

    # ---- ingest
    def on_ingest_outcome(self, outcome: str, reason: str | None = None) -> None:
        """Callback for the ingest pipeline: one call per file seen."""
        self.documents_seen.inc()
        if outcome == "ingested":
            self.documents_ingested.inc()
        elif outcome == "duplicate":
            self.documents_duplicate.inc()
        elif outcome == "quarantined":
            self.documents_quarantined.labels(reason or "unknown").inc()

    # ---- stages
    def on_stage_finished(
        self,
        result: StageResult,
        *,
        duration_s: float | None = None,
        finished_at: float | None = None,
    ) -> None:
        """A stage ended (``duration_s``/``finished_at`` from its row, when it has them)."""
        status = result.status
        if status in STAGE_OUTCOMES:
            self.stages.labels(status).inc()
        if duration_s is not None:
            self.stage_duration.observe(duration_s)
        if status == "promoted" and finished_at:
            self.last_stage_success.set(finished_at)
        self.set_stage_progress(None)
        metrics = result.metrics
        cand, base = metrics.get("candidate") or {}, metrics.get("baseline") or {}
        for name in EVAL_SETS:
            value = cand.get(f"{name}_loss")
            if isinstance(value, int | float):
                self.eval_loss.labels(name).set(value)
        cr, br = cand.get("retention_loss"), base.get("retention_loss")
        if isinstance(cr, int | float) and isinstance(br, int | float) and br > 0:
            self.forgetting_ratio.set(cr / br)

    def on_stage_progress(self, progress: dict[str, Any]) -> None:
        """A progress line of the running stage (also read back from the store by the
        daemon's refresh, so a resumed or restarted daemon shows it too)."""
        self.set_stage_progress(progress)

    def set_stage_progress(self, progress: dict[str, Any] | None) -> None:
        """Progress gauges from a stage's progress dict; ``None`` = no stage runs (0)."""
        progress = progress or {}
        step, total, tps = progress.get("step"), progress.get("total"), progress.get("tokens_per_s")
        ratio = 0.0
        if progress.get("phase") == "evaluate":
            ratio = 1.0  # training is done; the candidate is being evaluated
        elif isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
            ratio = min(1.0, max(0.0, step / total))
        self.stage_progress_ratio.set(ratio)
        running_tps = float(tps) if isinstance(tps, int | float) else 0.0
        self.stage_tokens_per_second.set(running_tps)
        if running_tps:
            self.train_tokens_per_second.set(running_tps)

    # ---- serving
    def on_swap(self, seconds: float, ok: bool, when: float) -> None:
        self.swaps.labels("ok" if ok else "failed").inc()
        if ok:
            self.swap_duration.observe(seconds)
            self.last_swap.set(when)

    def on_engine_restart(self, seconds: float) -> None:
        """The managed vLLM's engine died and was restarted and reconciled in ``seconds``."""
        self.vllm_engine_restarts.inc()
        self.vllm_engine_recovery.set(seconds)

    def set_adapter(self, version: str | None) -> None:
        """Exactly one ``evergreen_adapter_info`` series: the version now served."""
        with self._lock:
            if version == self._adapter_version:
                return
            if self._adapter_version is not None:
                self.adapter_info.remove(self._adapter_version)
            self._adapter_version = version
            if version is not None:
                self.adapter_info.labels(version).set(1)

    def set_vllm_up(self, endpoints: Iterable[tuple[str, bool]]) -> None:
        for endpoint, up in endpoints:
            self.vllm_up.labels(endpoint).set(1 if up else 0)

    def set_replicas(self, rows: Iterable[dict[str, Any]], current: str | None) -> None:
        """The fleet now (rows of :meth:`Swapper.replica_rows`): up and version per replica,
        and how many serve ``current``. Series of replicas that left are removed."""
        with self._lock:
            seen: dict[str, str | None] = {}
            for row in rows:
                endpoint, up = str(row["endpoint"]), bool(row["up"])
                version = row.get("serving") if up else None
                seen[endpoint] = version
                self.replica_up.labels(endpoint).set(1 if up else 0)
                self.vllm_up.labels(endpoint).set(1 if up else 0)
                old = self._replica_series.get(endpoint)
                if old is not None and old != version:
                    self.replica_version.remove(endpoint, old)
                if version is not None:
                    self.replica_version.labels(endpoint, version).set(1)
            for endpoint, old in self._replica_series.items():
                if endpoint in seen:
                    continue
                self.replica_up.remove(endpoint)
                self.vllm_up.remove(endpoint)
                if old is not None:
                    self.replica_version.remove(endpoint, old)
            self._replica_series = seen
            self.replicas_in_line.set(
                sum(1 for v in seen.values() if v is not None and v == (current or "base"))
            )


def endpoint_label(url: str) -> str:
    """host:port of an endpoint URL: bounded cardinality, no credentials."""
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0].rsplit("@", 1)[-1]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def serve_http(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    healthy: Callable[[], bool],
    status: Callable[[], dict[str, Any]],
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics``, ``/healthz`` (200 only while the loop is alive) and ``/status``."""
    prom_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok = healthy()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ok\n" if ok else b"loop stalled\n"]
        if path == "/status":
            try:
                body = json.dumps(status(), default=str).encode()
                start_response("200 OK", [("Content-Type", "application/json")])
            except Exception as exc:  # the store may be busy; say so rather than hang up
                log.warning("status failed: %s", exc)
                body = json.dumps({"error": str(exc)}).encode()
                start_response("500 Internal Server Error", [("Content-Type", "application/json")])
            return [body]
        if path in ("/metrics", "/"):
            return prom_app(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    server = make_server(
        host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
