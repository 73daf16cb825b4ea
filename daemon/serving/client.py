"""HTTP client for one vLLM OpenAI-compatible endpoint, with the routes the swapper needs.

:class:`VLLMClient` refuses to talk to a non-loopback endpoint without an API key, because the
adapter routes can change what every client of that server is served.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from daemon.errors import EvergreenError

PLUGIN_NAME = "evergreen"
ADMIN_HEADER = "X-Evergreen-Admin"  # see daemon.serving.vllm_guard


class VLLMError(EvergreenError, RuntimeError):
    """A vLLM endpoint misbehaved or refused a request; the message says which and why."""


class InsecureEndpointError(VLLMError):
    """A non-loopback endpoint without an API key (refused before any request is sent)."""


class PluginMissingError(VLLMError):
    """The endpoint does not run the evergreen vLLM plugin (needed for atomic swaps)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; names are not resolved (DNS can lie)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class VLLMClient:
    """Synchronous client for one vLLM OpenAI-compatible endpoint (thread-safe via httpx)."""

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        *,
        timeout: float = 60.0,
        name: str = "",
        admin_secret: str = "",
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise VLLMError(f"endpoint {base_url!r}: expected http(s)://host:port")
        if not api_key and not is_loopback(parts.hostname):
            raise InsecureEndpointError(
                f"endpoint {base_url}: refusing a non-loopback vLLM endpoint without an API key"
                " (set serving.api_key)"
            )
        self.base_url = base_url.rstrip("/")
        self.name = name or f"{parts.hostname}:{parts.port or 80}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        # Sent only on the admin routes (load, unload, alias); the plugin requires it there.
        self._admin = {ADMIN_HEADER: admin_secret} if admin_secret else {}

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"VLLMClient({self.base_url!r})"

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise VLLMError(f"{self.name}: {method} {path} failed: {exc}") from exc

    def _ok(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code >= 400:
            raise VLLMError(f"{self.name}: {what}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp

    # -- routes -----------------------------------------------------------------------------
    def health(self, timeout: float = 5.0) -> bool:
        try:
            return self._http.get("/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> dict[str, str | None]:
        """Served model ids -> their ``root`` (an adapter's path)."""
        data = self._ok(self._request("GET", "/v1/models"), "list models").json()
        return {m["id"]: m.get("root") for m in data.get("data", [])}

    def completion(
        self, model: str, prompt: str, *, max_tokens: int = 8, temperature: float = 0.0
    ) -> str:
        """Text of one non-streamed completion; greedy by default."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": 0,
        }
        resp = self._ok(self._request("POST", "/v1/completions", json=body), f"complete {model}")
        choices = resp.json().get("choices") or []
        if not choices or not isinstance(choices[0].get("text"), str):
            raise VLLMError(f"{self.name}: completion for {model} returned no text")
        return str(choices[0]["text"])

    def probe(self, model: str, *, timeout: float) -> bool | None:
        """One greedy 1-token completion: True if answered, False if the server failed it
        (HTTP 5xx, connection refused), None if it took longer than ``timeout`` (busy)."""
        body = {"model": model, "prompt": "a", "max_tokens": 1, "temperature": 0.0}
        try:
            resp = self._http.post("/v1/completions", json=body, timeout=timeout)
        except httpx.TimeoutException:
            return None
        except httpx.HTTPError:
            return False
        return resp.status_code < 500

    def load_lora(self, name: str, path: str | Path) -> None:
        body = {"lora_name": name, "lora_path": str(path)}
        resp = self._request("POST", "/v1/load_lora_adapter", json=body, headers=self._admin)
        self._ok(resp, f"load {name}")

    def unload_lora(self, name: str) -> None:
        body = {"lora_name": name}
        resp = self._request("POST", "/v1/unload_lora_adapter", json=body, headers=self._admin)
        self._ok(resp, f"unload {name}")

    def aliases(self) -> dict[str, dict[str, str]]:
        """Registered names -> ``{"target", "path"}`` (the plugin's view; aliases included)."""
        resp = self._request("GET", "/v1/evergreen/aliases")
        if resp.status_code == 404:
            raise PluginMissingError(
                f"{self.name}: the evergreen vLLM plugin is not loaded; install evergreen into"
                f" vLLM's environment and start vLLM with VLLM_PLUGINS={PLUGIN_NAME}"
            )
        body = self._ok(resp, "list aliases").json()
        return dict(body.get("aliases", {}))

    def set_alias(self, alias: str, target: str) -> dict[str, Any]:
        """Atomically point ``alias`` at the adapter loaded as ``target``."""
        body = {"alias": alias, "target": target}
        resp = self._request("POST", "/v1/evergreen/alias", json=body, headers=self._admin)
        if resp.status_code == 404 and "not loaded" not in resp.text:
            raise PluginMissingError(f"{self.name}: the evergreen vLLM plugin is not loaded")
        return dict(self._ok(resp, f"alias {alias} -> {target}").json())
