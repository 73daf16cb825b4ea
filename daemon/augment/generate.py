"""Asking an OpenAI-compatible server for rewrites: the I/O of model-based methods.

The target is the served vLLM (its base URL and key, the stable model name) unless
``augment.endpoint`` names another server. Augmentation is background work: it asks
only while the server is idle (``vllm:num_requests_running``, read the way the
``serving_load`` trigger reads it), uses short timeouts, and turns every failure into a
:class:`GenerateError` the runner records; nothing here raises anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.scheduling import probes
from policies.augment import Request


class GenerateError(EvergreenError, RuntimeError):
    """The server could not be asked (down, busy, timed out): try again later."""


class RequestRefused(GenerateError):
    """The server refused this one request (4xx, e.g. a prompt over its context length):
    asking again will not help, so the chunk is marked done with the reason."""


@dataclass(frozen=True)
class Target:
    """Where model-based methods send their prompts."""

    base_url: str
    api_key: str
    model: str
    served: bool  # the daemon's own vLLM (vs a configured endpoint)


def _read_key(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise GenerateError(f"cannot read API key file {path}: {exc.strerror}") from None


def resolve(cfg: Config) -> Target:
    """The configured endpoint, else the served vLLM; raises GenerateError if there is none."""
    a = cfg.augment
    if a.endpoint:
        url, served = a.endpoint.rstrip("/"), False
    else:
        endpoints = probes.serving_endpoints(cfg)
        if not endpoints:
            raise GenerateError("no server: serving.mode = 'none' and augment.endpoint is empty")
        url, served = endpoints[0], True
    if a.api_key_file:
        key = _read_key(Path(a.api_key_file).expanduser())
    elif served and cfg.serving.api_key:
        key = cfg.serving.api_key
    elif served and cfg.api_key_path.is_file():
        key = _read_key(cfg.api_key_path)
    else:
        key = ""
    return Target(url, key, a.model or cfg.serving.model_name, served)


class Generator:
    """One HTTP client for one run of augmentation; close it (or use ``with``)."""

    def __init__(self, cfg: Config, target: Target) -> None:
        self.cfg = cfg
        self.target = target
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self.client = httpx.Client(timeout=cfg.augment.request_timeout_s, headers=headers)

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def busy(self) -> str:
        """Why the server should not be asked now ("" = go ahead)."""
        a = self.cfg.augment
        if not a.busy_check:
            return ""
        running = probes.fetch_running([self.target.base_url], api_key=self.target.api_key)
        value = running.get(self.target.base_url)
        if value is None:
            return f"{self.target.base_url}/metrics unreachable (server down or no vLLM metrics)"
        if value > a.max_running:
            return f"server busy: {value:g} requests running > augment.max_running {a.max_running}"
        return ""

    def sample(self, request: Request, max_tokens: int) -> tuple[list[str], int]:
        """``request.n`` completions of ``request.prompt`` and the tokens they cost."""
        a = self.cfg.augment
        body: dict[str, Any] = {
            "model": self.target.model,
            "n": request.n,
            "max_tokens": max_tokens,
            "temperature": a.temperature,
        }
        if a.api == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        route = "chat/completions" if a.api == "chat" else "completions"
        try:
            resp = self.client.post(f"{self.target.base_url}/v1/{route}", json=body)
        except httpx.HTTPError as exc:
            raise GenerateError(f"{route}: {type(exc).__name__}: {exc}"[:300]) from None
        if 400 <= resp.status_code < 500 and resp.status_code not in (401, 403, 408, 429):
            raise RequestRefused(f"{route}: HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code != 200:
            raise GenerateError(f"{route}: HTTP {resp.status_code}: {resp.text[:200]}")
        return _parse(resp, a.api == "chat", route)


def _parse(resp: httpx.Response, chat: bool, route: str) -> tuple[list[str], int]:
    try:
        data = resp.json()
        choices = data["choices"]
        texts = [str((c["message"]["content"] if chat else c["text"]) or "") for c in choices]
        used = (data.get("usage") or {}).get("completion_tokens")
    except (ValueError, KeyError, TypeError) as exc:
        raise GenerateError(f"{route}: malformed response ({type(exc).__name__})") from None
    tokens = int(used) if isinstance(used, int) else sum(len(t) // 4 + 1 for t in texts)
    return texts, tokens
