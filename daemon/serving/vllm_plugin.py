"""A vLLM endpoint plugin: atomic model-name aliases for LoRA adapters.

Why a plugin: vLLM 0.32's public API cannot re-point a served name at new weights safely.

* ``/v1/unload_lora_adapter`` followed by a load leaves a window in which the name is not
  registered. A completion that passed vLLM's model check before the unload and looks its
  adapter up after it (tokenisation awaits in between) fails with "model does not exist".
* ``load_inplace`` keeps the name registered, but every later decode step re-reads the
  adapter from disk (measured 1.20x slower decode).
* Re-resolving the same name through the filesystem resolver creates a second adapter with
  the *same* ``lora_name``. vLLM compares and hashes ``LoRARequest`` by name, so a batch that
  holds requests from before and after the swap collapses both adapters into one entry when
  it activates them, and the prefix cache (keyed by name and path) can reuse KV blocks that
  were computed with the old weights.

This plugin avoids all three: every version is loaded once under its own versioned name
(``evergreen-v0007``, immutable path) through the normal ``/v1/load_lora_adapter``, and the
stable name is an *alias*: the same ``LoRARequest`` object registered under a second key.
Flipping the alias is one dict assignment on vLLM's event loop, so there is no window, no
second copy of the weights, no reload, and in-flight requests keep the adapter they started
with. Responses report the versioned name in their ``model`` field (like OpenAI snapshot
names), which tells a client exactly which version answered.

Routes (all under ``/v1`` so vLLM's ``--api-key`` middleware guards them):

* ``POST /v1/evergreen/alias``   ``{"alias": "evergreen", "target": "evergreen-v0007"}``
* ``GET  /v1/evergreen/aliases`` ``{"plugin": "evergreen", "api": 1, "aliases": {...}}``
* ``GET  /v1/models``            vLLM's list, plus each alias under its own id (vLLM's own
  route would list an alias under the target's name only).

The plugin also installs :class:`daemon.serving.vllm_guard.GuardMiddleware`: the admin
routes (load, unload, alias) need the daemon's admin secret besides the client key, pinned
version names cannot be re-pointed, and prompt-log-probs requests never share a batch with
LoRA requests of another model class (that mix kills vLLM 0.32's engine).

Loaded by vLLM through the ``vllm.endpoint_plugins`` entry point named ``evergreen``, which
vLLM only activates when ``VLLM_PLUGINS`` names it. This module imports nothing from the
daemon but :mod:`daemon.serving.vllm_guard` (no further imports), so it stays cheap inside
the vLLM process.
"""

import re
from argparse import Namespace
from typing import Any

from daemon.serving.vllm_guard import GuardMiddleware

PLUGIN_NAME = "evergreen"
PLUGIN_API = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": "EvergreenAliasError", "code": status}},
    )


def _models(raw_request: Any) -> Any:
    return raw_request.app.state.openai_serving_models


async def _set_alias(raw_request: Any) -> Any:
    try:
        body = await raw_request.json()
    except ValueError:
        return _error(400, "body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    alias, target = body.get("alias"), body.get("target")
    if not isinstance(alias, str) or not _NAME_RE.match(alias):
        return _error(400, "'alias' must be a model name without '/'")
    if not isinstance(target, str) or not target:
        return _error(400, "'target' must name a loaded LoRA adapter")
    models = _models(raw_request)
    if models.is_base_model(alias):
        return _error(400, f"alias '{alias}' conflicts with a served base model")
    # The same per-name lock vLLM's own load/unload/resolve take, so an alias flip never
    # interleaves with a concurrent load of the same name.
    async with models.lora_resolver_lock[alias]:
        lora = models.lora_requests.get(target)
        if lora is None:
            return _error(404, f"target adapter '{target}' is not loaded")
        previous = models.lora_requests.get(alias)
        models.lora_requests[alias] = lora
    return {
        "alias": alias,
        "target": lora.lora_name,
        "path": lora.lora_path,
        "previous": None if previous is None else previous.lora_name,
    }


async def _list_aliases(raw_request: Any) -> Any:
    models = _models(raw_request)
    return {
        "plugin": PLUGIN_NAME,
        "api": PLUGIN_API,
        "aliases": {
            key: {"target": lora.lora_name, "path": lora.lora_path}
            for key, lora in list(models.lora_requests.items())
        },
    }


async def _show_models(raw_request: Any) -> Any:
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    models = _models(raw_request)
    listing = await models.registry.show_available_models()
    base_name = models.base_model_paths[0].name
    for key, lora in list(models.lora_requests.items()):
        listing.data.append(
            ModelCard(
                id=key,
                root=lora.lora_path,
                parent=lora.base_model_name or base_name,
                permission=[ModelPermission()],
            )
        )
    return listing


class EvergreenPlugin:
    """The ``vllm.endpoint_plugins`` factory (a zero-argument class, as vLLM expects)."""

    name = PLUGIN_NAME
    required_tasks: tuple[str, ...] | None = ("generate",)

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter, Request

        router = APIRouter()

        async def set_alias(raw_request: Request) -> Any:
            return await _set_alias(raw_request)

        async def list_aliases(raw_request: Request) -> Any:
            return await _list_aliases(raw_request)

        async def show_models(raw_request: Request) -> Any:
            return await _show_models(raw_request)

        router.add_api_route("/v1/evergreen/alias", set_alias, methods=["POST"])
        router.add_api_route("/v1/evergreen/aliases", list_aliases, methods=["GET"])
        router.add_api_route("/v1/models", show_models, methods=["GET"])
        app.include_router(router)
        # Added before vLLM's own middlewares, so it runs inside them (after the key check).
        app.add_middleware(GuardMiddleware, app_state=app.state)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        """No per-app state: the routes read vLLM's own model registry."""
