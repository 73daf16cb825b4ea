"""A fake vLLM replica on loopback: the routes the swapper calls, with simulated latency.

Test infrastructure (benchmarks import tests' helpers, never the other way round):
``tests/test_fleet_unit.py`` uses a few for the fleet logic without starting vLLM, and
``benchmarks/scale_sim.py`` starts 50 to time the swap fan-out and the reconcile of a fleet
that is not on this machine. A fake of a *remote* fleet is the one fake the project allows
(the network beyond loopback).

Routes (as vLLM + the evergreen plugin answer them): ``GET /health``, ``GET
/v1/evergreen/aliases``, ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``,
``POST /v1/evergreen/alias``, ``POST /v1/completions``. A completion's text is derived from
the path of the adapter its model name resolves to, so the swapper's smoke and verify steps
compare what they compare on a real server: which weights answer under which name.
The admin routes check the ``X-Evergreen-Admin`` header when a secret is set.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Latency:
    """Seconds per route (median); each request draws from a log-normal around it."""

    load: float = 0.15  # load a LoRA from local disk / shared filesystem into vLLM
    completion: float = 0.04  # an 8-token greedy smoke completion
    control: float = 0.002  # health, aliases list, alias flip, unload
    sigma: float = 0.35  # spread of the log-normal (p99 ≈ 2.3 × median)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def sleep(self, median: float) -> None:
        if median > 0:
            time.sleep(median * self.rng.lognormvariate(0.0, self.sigma))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        replica = self.server.replica
        replica.latency.sleep(replica.latency.control)
        if self.path == "/health":
            self._reply(200, {})
        elif self.path == "/v1/evergreen/aliases":
            with replica.lock:
                self._reply(200, {"aliases": {k: dict(v) for k, v in replica.registry.items()}})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        replica = self.server.replica
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        route = self.path
        admin = self.headers.get("X-Evergreen-Admin")
        if route != "/v1/completions" and replica.secret and admin != replica.secret:
            self._reply(403, {"error": "admin secret required"})
            return
        code, answer = replica.handle(route, body)
        self._reply(code, answer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    replica: FakeReplica


class FakeReplica:
    """One fake vLLM server on ``host:port``; :meth:`stop` and :meth:`start` again model a
    replica that dies and comes back empty (a restarted vLLM has no adapters loaded)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str = "",
        latency: Latency | None = None,
    ) -> None:
        self.host, self.port, self.secret = host, port, secret
        self.latency = latency or Latency(0, 0, 0)
        self.registry: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()
        self.requests = 0
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeReplica:
        server = _Server((self.host, self.port), _Handler)
        server.replica = self
        self.port = server.server_address[1]
        self.registry = {}
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def handle(self, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One admin or completion request: (HTTP status, JSON body)."""
        self.requests += 1
        lat = self.latency
        if route == "/v1/load_lora_adapter":
            lat.sleep(lat.load)
            with self.lock:
                name = body["lora_name"]
                self.registry[name] = {"target": name, "path": str(body["lora_path"])}
            return 200, {}
        if route == "/v1/completions":
            lat.sleep(lat.completion)
            with self.lock:
                entry = self.registry.get(str(body.get("model")))
            if entry is None:
                return 404, {"error": f"model {body.get('model')} not found"}
            text = hashlib.sha256(entry["path"].encode()).hexdigest()[:12]
            return 200, {"choices": [{"text": text}]}
        lat.sleep(lat.control)
        with self.lock:
            if route == "/v1/unload_lora_adapter":
                self.registry.pop(str(body["lora_name"]), None)
                return 200, {}
            if route == "/v1/evergreen/alias":
                target = self.registry.get(str(body["target"]))
                if target is None:
                    return 404, {"error": f"{body['target']} not loaded"}
                self.registry[str(body["alias"])] = dict(target)
                return 200, {"alias": body["alias"], **target}
        return 404, {"error": "not found"}

    def serving(self, name: str) -> str | None:
        """The adapter path behind ``name`` now (None if not registered)."""
        with self.lock:
            entry = self.registry.get(name)
        return entry["path"] if entry else None


def write_adapter_files(path: Path, rank: int = 8) -> Path:
    """A minimal adapter dir that passes the swapper's checks (a LoRA config, a complete
    safetensors file with no tensors): the fake replicas never read the weights."""
    path.mkdir(parents=True, exist_ok=True)
    conf = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(conf), encoding="utf-8")
    header = b"{}      "  # padded to 8 bytes, as safetensors writers do
    (path / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return path
