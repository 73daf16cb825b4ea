"""The ASGI middleware of our vLLM plugin: admin routes and a batch gate.

Runs inside the vLLM API process (inner to vLLM's own ``--api-key`` middleware, so a
request here already carries the client key where vLLM requires one). It imports nothing
from the daemon.

**Admin routes.** The client key is for inference. Loading, unloading and aliasing
adapters (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, ``/v1/evergreen/alias``
and SageMaker's ``/adapters`` routes, which vLLM does not guard at all) also need the
daemon's admin secret in the ``X-Evergreen-Admin`` header. The secret comes from
``EVERGREEN_ADMIN_SECRET`` or, read at each request, the file named by
``EVERGREEN_ADMIN_SECRET_FILE``; with neither, those routes are refused (fail closed).
A pinned version name (``<name>-v0007``) is only ever loaded from the path it was first
loaded from in this server's life.

**Batch gate.** vLLM 0.32 (CPU) kills its engine when a request with prompt log-probs
(``echo`` + ``logprobs``, or ``prompt_logprobs``) shares a batch with a LoRA request of a
different model: the LoRA kernel sees the prompt-logits rows and the sampler rows
disagree (``einsum ... subscript b has size 2 ... 129``), both requests get HTTP 500 and
the engine is gone. The gate keeps them apart: a prompt-log-probs request waits until no
request of another model class is in flight and, while it waits or runs, holds back new
ones of the other class. Requests of the same class run together as before (a batch of
base-model prompt-log-probs requests, or of LoRA requests, is fine).
"""

import asyncio
import hmac
import json
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

ADMIN_HEADER = "x-evergreen-admin"
SECRET_ENV = "EVERGREEN_ADMIN_SECRET"
SECRET_FILE_ENV = "EVERGREEN_ADMIN_SECRET_FILE"
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/evergreen/alias")
ADMIN_PREFIXES = ("/adapters",)
GATE_ENV = "EVERGREEN_BATCH_GATE"
PINNED_RE = re.compile(r"^.+-v[0-9]{4,}$")
MAX_GATED_BODY = 64 * 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def admin_secret() -> str:
    """The admin secret this server accepts ("" = none: admin routes are refused)."""
    path = os.environ.get(SECRET_FILE_ENV, "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return ""
    return os.environ.get(SECRET_ENV, "").strip()


def normal_path(scope: Scope) -> str:
    """The request path without root path, repeated or trailing slashes."""
    path = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", "")))
    return "/" + "/".join(p for p in path.split("/") if p)


def is_admin_path(path: str) -> bool:
    return path in ADMIN_PATHS or any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES)


def wants_prompt_logprobs(body: dict[str, Any]) -> bool:
    """Whether vLLM will compute prompt log-probs for this request (completions, chat, or
    the token-in ``sampling_params`` form)."""
    params = body.get("sampling_params")
    if isinstance(params, dict) and params.get("prompt_logprobs") is not None:
        return True
    if body.get("prompt_logprobs") is not None:
        return True
    if not body.get("echo"):
        return False
    logprobs = body.get("logprobs")
    return (logprobs is not None and logprobs is not False) or bool(body.get("top_logprobs"))


class BatchGate:
    """Two classes of requests, "prompt log-probs on model class X" and "anything on the
    other class", never in flight together; prompt-log-probs requests get priority."""

    def __init__(self) -> None:
        self.active = {True: 0, False: 0}  # is_lora -> requests in flight
        self.plp = {True: 0, False: 0}  # is_lora -> prompt-logprobs requests waiting/running
        self.cond = asyncio.Condition()

    def _may_run(self, lora: bool, plp: bool) -> bool:
        other = not lora
        if plp:
            return self.active[other] == 0  # nothing of the other class in the batch
        return self.plp[other] == 0  # no prompt-logprobs request of the other class

    async def run(self, lora: bool, plp: bool, call: Callable[[], Awaitable[None]]) -> None:
        async with self.cond:
            if plp:
                self.plp[lora] += 1
            try:
                await self.cond.wait_for(lambda: self._may_run(lora, plp))
            except BaseException:
                if plp:
                    self.plp[lora] -= 1
                    self.cond.notify_all()
                raise
            self.active[lora] += 1
        try:
            await call()
        finally:
            async with self.cond:
                self.active[lora] -= 1
                if plp:
                    self.plp[lora] -= 1
                self.cond.notify_all()


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    chunks: list[bytes] = []
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False) or size > MAX_GATED_BODY:
            break
    return b"".join(chunks), messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _send_json(send: Send, status: int, message: str) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": "EvergreenGuardError", "code": status}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _pinned_load(path: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """(pinned name, path) when this admin call loads a pinned version name."""
    if path != "/v1/load_lora_adapter" and not path.startswith("/adapters"):
        return None
    name = body.get("lora_name", body.get("name"))
    where = body.get("lora_path", body.get("src"))
    if not isinstance(name, str) or not PINNED_RE.match(name) or not isinstance(where, str):
        return None
    return name, where


class GuardMiddleware:
    """Pure ASGI middleware: admin secret on admin routes, pinned names, the batch gate."""

    def __init__(self, app: ASGIApp, app_state: Any) -> None:
        self.app = app
        self.state = app_state  # FastAPI app.state (openai_serving_models once started)
        self.gate = BatchGate()
        self.pinned: dict[str, str] = {}  # pinned name -> real path it was first loaded from
        # Off only to show, in a test, the engine crash the gate prevents.
        self.gated = os.environ.get(GATE_ENV, "1") != "0"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = normal_path(scope)
        admin = is_admin_path(path)
        if admin and not self._admin_ok(scope):
            await _send_json(send, 403, "admin secret required")
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        raw, messages = await _read_body(receive)
        replay = _replay(messages, receive)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        if admin:
            refusal = self._pinned_refusal(path, body)
            if refusal:
                await _send_json(send, 409, refusal)
            else:
                await self.app(scope, replay, self._record_on_success(path, body, send))
            return
        model = body.get("model")
        lora = isinstance(model, str) and not self._is_base(model)
        plp = wants_prompt_logprobs(body)
        if not self.gated:
            await self.app(scope, replay, send)
            return
        await self.gate.run(lora, plp, lambda: self.app(scope, replay, send))

    def _admin_ok(self, scope: Scope) -> bool:
        secret = admin_secret()
        if not secret:
            return False
        headers = dict(scope.get("headers") or [])
        given = headers.get(ADMIN_HEADER.encode(), b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), secret.encode())

    def _models(self) -> Any:
        return getattr(self.state, "openai_serving_models", None)

    def _is_base(self, model: str) -> bool:
        models = self._models()
        return models is None or bool(models.is_base_model(model))

    def _pinned_refusal(self, path: str, body: dict[str, Any]) -> str:
        """Why this admin call would re-point a pinned name ("" when it would not)."""
        if path == "/v1/evergreen/alias":
            alias, target = body.get("alias"), body.get("target")
            if isinstance(alias, str) and PINNED_RE.match(alias) and target != alias:
                return f"'{alias}' is a pinned version name; it cannot become an alias"
            return ""
        load = _pinned_load(path, body)
        if load is None:
            return ""
        name, where = load
        real = os.path.realpath(where)
        first = self.pinned.get(name) or self._loaded_path(name) or real
        if first != real:
            return f"pinned name '{name}' serves {first}; it cannot be loaded from {where}"
        return ""

    def _record_on_success(self, path: str, body: dict[str, Any], send: Send) -> Send:
        """``send``, noting a pinned name's path once vLLM answers its load with 2xx: a load
        that fails (a wrong or missing path) must not bind the name to that path."""
        load = _pinned_load(path, body)
        if load is None:
            return send
        name, where = load

        async def recording(message: Message) -> None:
            if message.get("type") == "http.response.start" and 200 <= message["status"] < 300:
                self.pinned.setdefault(name, os.path.realpath(where))
            await send(message)

        return recording

    def _loaded_path(self, name: str) -> str:
        models = self._models()
        lora = None if models is None else models.lora_requests.get(name)
        return "" if lora is None else os.path.realpath(lora.lora_path)
