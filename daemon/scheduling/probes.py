"""The only I/O the trigger policies depend on: vLLM load and free memory.

Kept apart from the policies so those stay pure: :mod:`daemon.scheduling.decisions` calls these (only
when the configured tree uses ``serving_load`` / ``resources``) and puts the numbers in
the :class:`~policies.base.TriggerState`. Short timeouts: a hung vLLM must not stall the
scheduler tick, and an unreachable endpoint is reported as ``None``, not raised.
"""

from __future__ import annotations

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import Config

RUNNING_METRIC = "vllm:num_requests_running"
PROBE_TIMEOUT_S = 2.0


def serving_endpoints(cfg: Config) -> list[str]:
    """Base URLs whose load matters: the managed server, or the external ones."""
    if cfg.serving.mode == "managed":
        host = cfg.serving.host if cfg.serving.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return [f"http://{host}:{cfg.serving.port}"]
    if cfg.serving.mode == "external":
        return [str(e).rstrip("/") for e in cfg.serving.endpoints]
    return []


def parse_running(text: str) -> float:
    """Sum of ``vllm:num_requests_running`` over its label sets (one per model)."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == RUNNING_METRIC:
                total += float(sample.value)
                found = True
    if not found:
        raise ValueError(f"{RUNNING_METRIC} not in /metrics")
    return total


def fetch_running(
    endpoints: list[str], *, timeout: float = PROBE_TIMEOUT_S, api_key: str = ""
) -> dict[str, float | None]:
    """endpoint -> running requests; None when unreachable or unparsable."""
    out: dict[str, float | None] = {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for endpoint in endpoints:
            try:
                resp = client.get(f"{endpoint.rstrip('/')}/metrics")
                resp.raise_for_status()
                out[endpoint] = parse_running(resp.text)
            except (httpx.HTTPError, ValueError):
                out[endpoint] = None
    return out


def free_memory() -> int:
    """Memory available to a new process without swapping, in bytes."""
    return int(psutil.virtual_memory().available)
