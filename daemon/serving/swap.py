"""The swapper: flip the stable name on every vLLM endpoint to one adapter version, or on none.

Names on each endpoint (``model_name`` = ``evergreen`` by default):

* ``evergreen-v0007``: every promoted version, loaded once from its immutable dir (clients may
  pin it). Versions that are not loaded are found lazily by vLLM's filesystem resolver through
  ``<state>/serving/resolve/evergreen-v0007`` links.
* ``evergreen-base``: a zero LoRA (B = 0), the stand-in for the base model.
* ``evergreen``: an *alias* of one of the above, flipped atomically by our vLLM plugin
  (:mod:`daemon.serving.vllm_plugin` explains why an alias and not a reload).

A swap to version V, on the N endpoints that are up, all or none:

0. validate V's dir locally (inside the state dir, safetensors only, not truncated);
   ask every endpoint's ``/health`` at once; those down are skipped and are brought in
   line by the reconcile when they come back (none up: :class:`NoEndpointUp`, and
   :mod:`daemon.serving.promotion` moves the pointer for the reconcile to serve);
1. load ``evergreen-V`` everywhere and run a greedy smoke completion. Any failure: unload
   what this swap loaded, record ``swap.failed``, raise :class:`SwapError`; nothing changed.
2. flip the alias on each endpoint; if one flip fails, flip the others back.
3. verify: the alias points at V and greedy output under ``evergreen`` equals V's; otherwise
   flip everything back.

This module never moves the store's current pointer: :mod:`daemon.serving.promotion` does,
after a successful swap. :mod:`daemon.serving.reconcile` (startup, periodically, after a vLLM
restart) brings each endpoint back to the store's pointer with the same steps. In external
mode the endpoint set itself is recomputed at every reconcile (:mod:`daemon.serving.fleet`:
config, DNS, SIGHUP reload), so a replica that joins gets the current adapter then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.serving import fleet as fleet_mod
from daemon.serving import reconcile as reconcile_mod
from daemon.serving.adapters import (
    BASE_VERSION,
    AdapterRejected,
    adapter_path,
    ensure_zero_adapter,
    link_for_resolver,
    served_name,
    validate_adapter_dir,
)
from daemon.serving.apikey import load_or_create_admin_secret
from daemon.serving.audit import record_event
from daemon.serving.client import VLLMClient, VLLMError
from daemon.serving.fleet import (
    EndpointState,
    Fleet,
    Resolver,
    resolve_addresses,
    save_replicas,
)

log = logging.getLogger(__name__)

VERIFY_ATTEMPTS = 3
MAX_PARALLEL = 32  # endpoints contacted at once (a swap's load/verify, a reconcile)
_T = TypeVar("_T")


def _lap(timings: dict[str, float], step: str, mark: float) -> float:
    now = time.monotonic()
    timings[step] = round(now - mark, 4)
    return now


class SwapError(EvergreenError, RuntimeError):
    """A swap that did not happen; the endpoints still serve what they served before."""


class NoEndpointUp(VLLMError):
    """No endpoint answers ``/health`` (vLLM restarting, the fleet down): nothing to swap
    now. The caller may still move the store's pointer; the reconcile serves it later."""


@dataclass
class SwapResult:
    version: str
    ok: bool
    seconds: float
    previous: dict[str, str | None] = field(default_factory=dict)  # endpoint -> old target
    message: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # seconds per swap step
    skipped: list[str] = field(default_factory=list)  # endpoints down at swap time


class Swapper:
    """Keeps the stable name on every endpoint pointed at the store's current adapter.

    Thread-safe: :attr:`lock` serialises swaps, reconciles and (held by
    :mod:`daemon.serving.promotion`) the pointer move after a swap, so a reconcile never sees
    the new version served and the old one current. ``on_swap`` callbacks get each
    :class:`SwapResult` (ok or not) for metrics.
    """

    def __init__(
        self,
        cfg: Config,
        endpoints: Sequence[VLLMClient],
        *,
        on_swap: Callable[[SwapResult], None] | None = None,
        owns_endpoints: bool = False,
        fleet: Fleet | None = None,
        make_client: Callable[[str], VLLMClient] | None = None,
    ) -> None:
        """``owns_endpoints``: :meth:`close` closes the clients too (only for clients made
        for this swapper; the managed server's client outlives any one swapper). ``fleet``
        and ``make_client``: the endpoint set follows the fleet (:meth:`sync_endpoints`)."""
        if not endpoints and fleet is None:
            raise ValueError("Swapper needs at least one endpoint")
        self.cfg = cfg
        self.endpoints = list(endpoints)
        self.owns_endpoints = owns_endpoints
        self.stable = cfg.serving.model_name
        self.on_swap: list[Callable[[SwapResult], None]] = [on_swap] if on_swap else []
        self.states = {ep.name: EndpointState(ep.name, ep.base_url) for ep in self.endpoints}
        self.lock = threading.RLock()
        self.last_reconcile_error: dict[str, str] = {}  # endpoint -> last error recorded
        self.fleet = fleet
        self.make_client = make_client
        self.synced = False  # the first sync_endpoints is start-up, not a fleet change

    @classmethod
    def from_config(
        cls, cfg: Config, *, resolve: Resolver = resolve_addresses, **kwargs: Any
    ) -> Swapper:
        """External mode: one client per replica of the fleet (``serving.endpoints`` and
        every address of ``serving.endpoints_dns``), with the configured key and the admin
        secret of ``<state>/vllm-admin-secret`` (the servers read that file through
        ``EVERGREEN_ADMIN_SECRET_FILE``)."""
        sc = cfg.serving
        if not sc.endpoints and not sc.endpoints_dns:
            raise SwapError(
                "serving.mode = 'external' needs serving.endpoints or serving.endpoints_dns"
            )
        key, admin = sc.api_key, load_or_create_admin_secret(cfg)

        def make_client(url: str) -> VLLMClient:
            return VLLMClient(url, key, timeout=sc.request_timeout_s, admin_secret=admin)

        fleet = Fleet(sc, resolve)
        swapper = cls(cfg, [], owns_endpoints=True, fleet=fleet, make_client=make_client, **kwargs)
        swapper.sync_endpoints(strict=True)
        return swapper

    def sync_endpoints(self, *, strict: bool = False) -> tuple[list[str], list[str]]:
        """Make the endpoint set the fleet's now (see :func:`daemon.serving.fleet.sync`)."""
        return fleet_mod.sync(self, strict=strict)

    # -- views for metrics / status -----------------------------------------------------------
    def endpoint_states(self) -> list[tuple[str, bool]]:
        return [(s.url, s.up) for s in self.states.values()]

    def replica_rows(self) -> list[dict[str, Any]]:
        """One row per endpoint: name, up, the version its stable name serves, last error."""
        return fleet_mod.replica_rows(self)

    def served_version(self) -> str | None:
        """The version every endpoint that is up serves under the stable name; None if they
        disagree or none is up."""
        versions = {s.serving for s in self.states.values() if s.up}
        return versions.pop() if len(versions) == 1 else None

    # -- the swap ---------------------------------------------------------------------------
    def target(self, version: str) -> Path:
        if version == BASE_VERSION:
            path = ensure_zero_adapter(self.cfg)
        else:
            path = adapter_path(self.cfg, version)
        validate_adapter_dir(self.cfg, path)
        link_for_resolver(self.cfg, version, path)
        return path

    def _ensure_loaded(
        self, ep: VLLMClient, name: str, path: Path, registry: dict[str, dict[str, str]]
    ) -> bool:
        """Load ``name`` from ``path`` unless already loaded from there; True if loaded now."""
        registered = registry.get(name)
        if registered is not None:
            if registered.get("target") == name and Path(registered["path"]).resolve() == path:
                return False
            ep.unload_lora(name)  # a stale registration of our versioned name
        ep.load_lora(name, path)
        return True

    def _smoke(self, ep: VLLMClient, model: str) -> str:
        sc = self.cfg.serving
        return ep.completion(model, sc.smoke_prompt, max_tokens=sc.smoke_max_tokens)

    def verify(self, ep: VLLMClient, expected: str) -> None:
        got = ""
        for _ in range(VERIFY_ATTEMPTS):  # batch composition can flip a near-tie; retry
            got = self._smoke(ep, self.stable)
            if got == expected:
                return
        raise VLLMError(f"{ep.name}: greedy output under {self.stable} {got!r} != {expected!r}")

    def prepare(self, ep: VLLMClient, name: str, path: Path) -> tuple[str | None, bool, str]:
        """Step 1 on one endpoint: (previous alias target, loaded now?, candidate's output)."""
        registry = ep.aliases()
        previous = (registry.get(self.stable) or {}).get("target")
        loaded = self._ensure_loaded(ep, name, path, registry)
        try:
            return previous, loaded, self._smoke(ep, name)
        except VLLMError:
            if loaded:
                with contextlib.suppress(VLLMError):
                    ep.unload_lora(name)
            raise

    def flip(self, ep: VLLMClient, name: str) -> None:
        answer = ep.set_alias(self.stable, name)
        if answer.get("target") != name:
            raise VLLMError(
                f"{ep.name}: {self.stable} points at {answer.get('target')}, not {name}"
            )

    @staticmethod
    def _each(
        endpoints: Sequence[VLLMClient], fn: Callable[[VLLMClient], _T]
    ) -> tuple[dict[str, _T], list[Exception]]:
        """Run ``fn`` on the endpoints at once: (results by endpoint, errors)."""
        results: dict[str, _T] = {}
        errors: list[Exception] = []
        if len(endpoints) == 1:
            ep = endpoints[0]
            try:
                results[ep.name] = fn(ep)
            except (VLLMError, OSError) as exc:
                errors.append(exc)
            return results, errors
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(endpoints)))) as pool:
            futures = {ep.name: pool.submit(fn, ep) for ep in endpoints}
        for name, future in futures.items():
            err = future.exception()
            if err is None:
                results[name] = future.result()
            elif isinstance(err, VLLMError | OSError):
                errors.append(err)
            else:
                raise err
        return results, errors

    def up_endpoints(self) -> list[VLLMClient]:
        """The endpoints whose ``/health`` answers now (asked at once); the others are
        marked down. Raises :class:`NoEndpointUp` when none is up."""
        healthy, _ = self._each(self.endpoints, lambda ep: ep.health())
        for ep in self.endpoints:
            if not healthy.get(ep.name):
                st = self.states[ep.name]
                st.up, st.serving, st.checked_at = False, None, time.time()
        up = [ep for ep in self.endpoints if healthy.get(ep.name)]
        if not up:
            raise NoEndpointUp(f"no endpoint is up (of {len(self.endpoints)})")
        return up

    def swap_to(self, version: str, *, reason: str = "") -> SwapResult:
        """Serve ``version`` under the stable name on every endpoint that is up, or on none
        (raises :class:`SwapError`); endpoints down now get it from the reconcile when they
        return. With none up, raises :class:`NoEndpointUp` once ``version`` is validated."""
        with self.lock:
            started = time.monotonic()
            name = served_name(self.cfg, version)
            loaded: list[VLLMClient] = []
            flipped: list[VLLMClient] = []
            previous: dict[str, str | None] = {}
            timings: dict[str, float] = {}
            stage = "validate"
            mark = started
            targets: list[VLLMClient] = []
            try:
                path = self.target(version)
                stage, mark = "health", _lap(timings, "validate", mark)
                targets = self.up_endpoints()
                stage, mark = "load", _lap(timings, "health", mark)
                prepared, errors = self._each(targets, lambda ep: self.prepare(ep, name, path))
                previous = {k: v[0] for k, v in prepared.items()}
                loaded = [ep for ep in targets if prepared.get(ep.name, ("", False))[1]]
                if errors:  # endpoints that failed have already unloaded what they loaded
                    raise errors[0]
                stage, mark = "flip", _lap(timings, "load_smoke", mark)
                for ep in targets:
                    flipped.append(ep)
                    self.flip(ep, name)
                stage, mark = "verify", _lap(timings, "flip", mark)
                _, errors = self._each(targets, lambda ep: self.verify(ep, prepared[ep.name][2]))
                if errors:
                    raise errors[0]
                _lap(timings, "verify", mark)
            except NoEndpointUp:
                raise  # the version is valid; there is just nowhere to serve it now
            except (VLLMError, AdapterRejected, OSError) as exc:
                self._undo(name, loaded, flipped, previous)
                return self._failed(
                    version, stage=stage, exc=exc, started=started, previous=previous, reason=reason
                )
            seconds = time.monotonic() - started
            for ep in targets:
                st = self.states[ep.name]
                st.up, st.serving, st.last_error, st.checked_at = True, version, "", time.time()
            skipped = [ep.name for ep in self.endpoints if ep not in targets]
            result = SwapResult(
                version, True, seconds, previous, f"serving {version}", timings, skipped
            )
            down = f" ({len(skipped)} down, reconciled when back)" if skipped else ""
            record_event(
                self.cfg,
                "swap.done",
                f"{self.stable} -> {name} on {len(targets)} endpoint(s){down} in {seconds:.2f}s"
                + (f": {reason}" if reason else ""),
                version,
                {"seconds": seconds, "previous": previous, "reason": reason, "skipped": skipped},
            )
            log.info("swapped %s -> %s in %.2fs (%s)", self.stable, name, seconds, reason or "-")
            self._notify(result)
            return result

    def _undo(
        self,
        name: str,
        loaded: list[VLLMClient],
        flipped: list[VLLMClient],
        previous: dict[str, str | None],
    ) -> None:
        """Put back what a failed swap changed: the aliases, then this swap's loads."""
        for ep in flipped:
            old = previous.get(ep.name)
            try:
                if old and old != self.stable:
                    ep.set_alias(self.stable, old)
                elif old is None:
                    ep.unload_lora(self.stable)
            except VLLMError as exc:
                log.error("rollback of %s on %s failed: %s", self.stable, ep.name, exc)
        for ep in loaded:
            with contextlib.suppress(VLLMError):
                ep.unload_lora(name)

    def _failed(
        self,
        version: str,
        *,
        stage: str,
        exc: Exception,
        started: float,
        previous: dict[str, str | None],
        reason: str,
    ) -> SwapResult:
        seconds = time.monotonic() - started
        message = f"swap to {version} failed at {stage}: {exc}"
        result = SwapResult(version, False, seconds, previous, message)
        record_event(
            self.cfg,
            "swap.failed",
            message,
            version,
            {"stage": stage, "error": str(exc), "previous": previous, "reason": reason},
        )
        log.error("%s", message)
        self._notify(result)
        raise SwapError(message) from exc

    def _notify(self, result: SwapResult) -> None:
        save_replicas(self.cfg, self.replica_rows())
        for callback in self.on_swap:
            try:
                callback(result)
            except Exception:
                log.exception("on_swap callback failed")

    # -- reconcile --------------------------------------------------------------------------
    def reconcile(self) -> dict[str, str]:
        """Bring each endpoint's stable name to the store's current version (see
        :func:`daemon.serving.reconcile.reconcile`)."""
        return reconcile_mod.reconcile(self)

    def close(self) -> None:
        if not self.owns_endpoints:
            return
        for ep in self.endpoints:
            ep.close()
