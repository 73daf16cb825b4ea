"""The swapper: make every vLLM endpoint agree with the store's current adapter.

Names on each endpoint (``model_name`` = ``evergreen`` by default):

* ``evergreen-v0007``: every promoted version, loaded once from its immutable dir (clients may
  pin it). Versions that are not loaded are found lazily by vLLM's filesystem resolver through
  ``<state>/serving/resolve/evergreen-v0007`` links.
* ``evergreen-base``: a zero LoRA (B = 0), the stand-in for the base model.
* ``evergreen``: an *alias* of one of the above, flipped atomically by our vLLM plugin
  (:mod:`daemon.serving.vllm_plugin` explains why an alias and not a reload).

A swap to version V, on N endpoints, all or none:

1. validate V's dir locally (inside the state dir, safetensors only, not truncated);
   load ``evergreen-V`` everywhere and run a greedy smoke completion. Any failure: unload
   what this swap loaded, record ``swap.failed``, raise :class:`SwapError`; nothing changed.
2. flip the alias on each endpoint; if one flip fails, flip the others back.
3. verify: the alias points at V and greedy output under ``evergreen`` equals V's; otherwise
   flip everything back.

:meth:`Swapper.reconcile` (startup, periodically, after a vLLM restart) re-does the same per
endpoint wherever the alias does not point at the store's current version. Store pointer
moves happen only in :meth:`Swapper.promote` / :meth:`Swapper.rollback` (after a successful
swap) and in :func:`promote_version` / :func:`rollback_version` used by the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.serving.adapters import (
    BASE_VERSION,
    AdapterRejected,
    adapter_path,
    ensure_zero_adapter,
    link_for_resolver,
    served_name,
    validate_adapter_dir,
)
from daemon.serving.vllm import VLLMClient, VLLMError, load_or_create_api_key
from store import adapters as store_adapters
from store import events
from store.db import open_db

log = logging.getLogger(__name__)

VERIFY_ATTEMPTS = 3
_T = TypeVar("_T")


def _lap(timings: dict[str, float], step: str, mark: float) -> float:
    now = time.monotonic()
    timings[step] = round(now - mark, 4)
    return now


class SwapError(EvergreenError, RuntimeError):
    """A swap that did not happen; the endpoints still serve what they served before."""


@dataclass
class SwapResult:
    version: str
    ok: bool
    seconds: float
    previous: dict[str, str | None] = field(default_factory=dict)  # endpoint -> old target
    message: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # seconds per swap step


@dataclass
class EndpointState:
    """What the swapper last saw on one endpoint (read by metrics and ``status``)."""

    name: str
    url: str
    up: bool = False
    serving: str | None = None  # version behind the stable name, "base", or None if unknown
    last_error: str = ""
    checked_at: float = 0.0


@contextlib.contextmanager
def _db(cfg: Config) -> Iterator[sqlite_utils.Database]:
    db = open_db(cfg.db_path)
    try:
        yield db
    finally:
        db.conn.close()


def _record(cfg: Config, kind: str, message: str, version: str, data: dict[str, Any]) -> None:
    try:
        with _db(cfg) as db:
            events.record(db, kind, message, subject=version, track=cfg.track, data=data)
    except Exception:  # the audit log must not turn a swap outcome into a crash
        log.exception("could not record %s event", kind)


class Swapper:
    """Keeps the stable name on every endpoint pointed at the store's current adapter.

    Thread-safe: one lock serialises swaps and reconciles. ``on_swap`` callbacks get each
    :class:`SwapResult` (ok or not) for metrics; ``durations`` keeps recent swap seconds.
    """

    def __init__(
        self,
        cfg: Config,
        endpoints: Sequence[VLLMClient],
        *,
        on_swap: Callable[[SwapResult], None] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("Swapper needs at least one endpoint")
        self.cfg = cfg
        self.endpoints = list(endpoints)
        self.stable = cfg.serving.model_name
        self.on_swap: list[Callable[[SwapResult], None]] = [on_swap] if on_swap else []
        self.states = {ep.name: EndpointState(ep.name, ep.base_url) for ep in self.endpoints}
        self.durations: deque[float] = deque(maxlen=1000)
        self.last_swap_at = 0.0
        self.swaps_ok = 0
        self.swaps_failed = 0
        self._lock = threading.RLock()
        self._last_reconcile_error: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Swapper:
        """External mode: one client per ``serving.endpoints`` URL, with the configured key."""
        key = cfg.serving.api_key
        eps = [
            VLLMClient(url, key, timeout=cfg.serving.request_timeout_s)
            for url in cfg.serving.endpoints
        ]
        if not eps:
            raise SwapError("serving.mode = 'external' needs at least one serving.endpoints URL")
        return cls(cfg, eps, **kwargs)

    # -- views for metrics / status -----------------------------------------------------------
    def endpoint_states(self) -> list[tuple[str, bool]]:
        return [(s.url, s.up) for s in self.states.values()]

    def served_version(self) -> str | None:
        """The version every endpoint serves under the stable name; None if they disagree."""
        versions = {s.serving for s in self.states.values()}
        return versions.pop() if len(versions) == 1 else None

    def status(self) -> dict[str, Any]:
        return {
            "stable_name": self.stable,
            "served_version": self.served_version(),
            "last_swap_at": self.last_swap_at,
            "swaps_ok": self.swaps_ok,
            "swaps_failed": self.swaps_failed,
            "endpoints": [vars(s).copy() for s in self.states.values()],
        }

    # -- the swap ---------------------------------------------------------------------------
    def _target(self, version: str) -> Path:
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

    def _verify(self, ep: VLLMClient, expected: str) -> None:
        got = ""
        for _ in range(VERIFY_ATTEMPTS):  # batch composition can flip a near-tie; retry
            got = self._smoke(ep, self.stable)
            if got == expected:
                return
        raise VLLMError(f"{ep.name}: greedy output under {self.stable} {got!r} != {expected!r}")

    def _prepare(self, ep: VLLMClient, name: str, path: Path) -> tuple[str | None, bool, str]:
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

    def _flip(self, ep: VLLMClient, name: str) -> None:
        answer = ep.set_alias(self.stable, name)
        if answer.get("target") != name:
            raise VLLMError(
                f"{ep.name}: {self.stable} points at {answer.get('target')}, not {name}"
            )

    def _each(self, fn: Callable[[VLLMClient], _T]) -> tuple[dict[str, _T], list[Exception]]:
        """Run ``fn`` on every endpoint at once: (results by endpoint, errors)."""
        results: dict[str, _T] = {}
        errors: list[Exception] = []
        if len(self.endpoints) == 1:
            ep = self.endpoints[0]
            try:
                results[ep.name] = fn(ep)
            except (VLLMError, OSError) as exc:
                errors.append(exc)
            return results, errors
        with ThreadPoolExecutor(max_workers=len(self.endpoints)) as pool:
            futures = {ep.name: pool.submit(fn, ep) for ep in self.endpoints}
        for name, future in futures.items():
            err = future.exception()
            if err is None:
                results[name] = future.result()
            elif isinstance(err, VLLMError | OSError):
                errors.append(err)
            else:
                raise err
        return results, errors

    def swap_to(self, version: str, *, reason: str = "") -> SwapResult:
        """Serve ``version`` under the stable name on every endpoint, or on none (raises)."""
        with self._lock:
            started = time.monotonic()
            name = served_name(self.cfg, version)
            loaded: list[VLLMClient] = []
            flipped: list[VLLMClient] = []
            previous: dict[str, str | None] = {}
            timings: dict[str, float] = {}
            stage = "validate"
            mark = started
            try:
                path = self._target(version)
                stage, mark = "load", _lap(timings, "validate", mark)
                prepared, errors = self._each(lambda ep: self._prepare(ep, name, path))
                previous = {k: v[0] for k, v in prepared.items()}
                loaded = [ep for ep in self.endpoints if prepared.get(ep.name, ("", False))[1]]
                if errors:  # endpoints that failed have already unloaded what they loaded
                    raise errors[0]
                stage, mark = "flip", _lap(timings, "load_smoke", mark)
                for ep in self.endpoints:
                    flipped.append(ep)
                    self._flip(ep, name)
                stage, mark = "verify", _lap(timings, "flip", mark)
                _, errors = self._each(lambda ep: self._verify(ep, prepared[ep.name][2]))
                if errors:
                    raise errors[0]
                _lap(timings, "verify", mark)
            except (VLLMError, AdapterRejected, OSError) as exc:
                self._undo(name, loaded, flipped, previous)
                return self._failed(
                    version, stage=stage, exc=exc, started=started, previous=previous, reason=reason
                )
            seconds = time.monotonic() - started
            for ep in self.endpoints:
                st = self.states[ep.name]
                st.up, st.serving, st.last_error, st.checked_at = True, version, "", time.time()
            result = SwapResult(version, True, seconds, previous, f"serving {version}", timings)
            self.durations.append(seconds)
            self.last_swap_at = time.time()
            self.swaps_ok += 1
            _record(
                self.cfg,
                "swap.done",
                f"{self.stable} -> {name} on {len(self.endpoints)} endpoint(s) in {seconds:.2f}s"
                + (f": {reason}" if reason else ""),
                version,
                {"seconds": seconds, "previous": previous, "reason": reason},
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
        self.swaps_failed += 1
        result = SwapResult(version, False, seconds, previous, message)
        _record(
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
        for callback in self.on_swap:
            try:
                callback(result)
            except Exception:
                log.exception("on_swap callback failed")

    # -- pointer moves ----------------------------------------------------------------------
    def promote(self, version: str, reason: str = "promote") -> SwapResult:
        """Swap to ``version``, then (only if that worked) make it current in the store.

        This is the ``swap(version, reason)`` callable a promoted stage is handed; it raises
        :class:`SwapError` (pointer unchanged) when the swap does not happen.
        """
        with self._lock:
            _known_version(self.cfg, version)
            result = self.swap_to(version, reason=reason)
            with _db(self.cfg) as db:
                store_adapters.set_current(db, version, track=self.cfg.track, reason=reason)
            return result

    def rollback(self, version: str | None = None, *, reason: str = "rollback") -> SwapResult:
        """Swap back to ``version`` (default: the promoted one before current) and point at it."""
        with self._lock:
            target = _rollback_target(self.cfg, version)
            return self.promote(target, reason=reason)

    # -- reconcile --------------------------------------------------------------------------
    def wanted_version(self) -> str:
        with _db(self.cfg) as db:
            return store_adapters.current(db, self.cfg.track) or BASE_VERSION

    def reconcile(self) -> dict[str, str]:
        """Bring each endpoint's stable name to the store's current version; per endpoint.

        Returns ``{endpoint: "ok" | "restored" | "down" | "error: ..."}``. An endpoint that
        restarted and lost its adapters is restored here. Failures are recorded once per
        distinct error (``swap.failed``), not on every period.
        """
        with self._lock:
            want = self.wanted_version()
            name = served_name(self.cfg, want)
            out: dict[str, str] = {}
            for ep in self.endpoints:
                out[ep.name] = self._reconcile_one(ep, want, name)
            return out

    def _reconcile_one(self, ep: VLLMClient, want: str, name: str) -> str:
        st = self.states[ep.name]
        st.checked_at = time.time()
        if not ep.health():
            st.up, st.serving = False, None
            return "down"
        st.up = True
        try:
            alias = ep.aliases().get(self.stable)
            path = self._target(want)
            if alias and alias.get("target") == name and Path(alias["path"]).resolve() == path:
                st.serving, st.last_error = want, ""
                self._last_reconcile_error.pop(ep.name, None)
                return "ok"
            _, _, expected = self._prepare(ep, name, path)
            self._flip(ep, name)
            self._verify(ep, expected)
        except (VLLMError, AdapterRejected, OSError) as exc:
            st.last_error = str(exc)
            st.serving = None
            if self._last_reconcile_error.get(ep.name) != str(exc):
                self._last_reconcile_error[ep.name] = str(exc)
                _record(
                    self.cfg,
                    "swap.failed",
                    f"reconcile {ep.name} to {want} failed: {exc}",
                    want,
                    {"stage": "reconcile", "endpoint": ep.name, "error": str(exc)},
                )
            log.warning("reconcile %s to %s failed: %s", ep.name, want, exc)
            return f"error: {exc}"
        st.serving, st.last_error = want, ""
        self._last_reconcile_error.pop(ep.name, None)
        _record(
            self.cfg,
            "swap.reconciled",
            f"{ep.name}: {self.stable} restored to {name}",
            want,
            {"endpoint": ep.name, "previous": (alias or {}).get("target")},
        )
        log.info("reconcile: %s now serves %s as %s", ep.name, name, self.stable)
        return "restored"

    def start_reconciler(self, interval: float | None = None) -> None:
        """Optional: reconcile every ``interval`` s in a daemon thread (until :meth:`stop`)."""
        interval = interval or self.cfg.serving.reconcile_interval_s
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reconcile()
                except Exception:
                    log.exception("reconcile failed")

        self._thread = threading.Thread(target=run, name="swap-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def close(self) -> None:
        self.stop()
        for ep in self.endpoints:
            ep.close()


# -- helpers shared with the CLI --------------------------------------------------------------
def _known_version(cfg: Config, version: str) -> dict[str, Any]:
    with _db(cfg) as db:
        row = store_adapters.get(db, version)
    if row is None or row["track"] != cfg.track:
        raise SwapError(f"unknown adapter version {version!r} on track {cfg.track!r}")
    if row["status"] == store_adapters.REJECTED:
        raise SwapError(f"adapter {version} was rejected by the promotion gate")
    return row


def _rollback_target(cfg: Config, version: str | None) -> str:
    if version:
        return version
    with _db(cfg) as db:
        current = store_adapters.current(db, cfg.track)
        if current is None:
            raise SwapError("nothing to roll back: no adapter is current")
        target = store_adapters.previous_promoted(db, cfg.track, current)
    if target is None:
        raise SwapError(f"no promoted version before {current} to roll back to")
    return target


def cli_endpoints(cfg: Config) -> list[VLLMClient]:
    """Endpoints the CLI can reach now: external ones, or the managed server if it is up."""
    mode = cfg.serving.mode
    if mode == "none":
        return []
    if mode == "external":
        return Swapper.from_config(cfg).endpoints
    host = f"[{cfg.serving.host}]" if ":" in cfg.serving.host else cfg.serving.host
    key_file = cfg.state_path / "vllm-api-key"
    if not cfg.serving.api_key and not key_file.exists():
        return []  # the managed server never ran in this state dir
    ep = VLLMClient(
        f"http://{host}:{cfg.serving.port}",
        load_or_create_api_key(cfg),
        timeout=cfg.serving.request_timeout_s,
    )
    if not ep.health(timeout=2.0):
        ep.close()
        return []
    return [ep]


def _move_pointer(cfg: Config, version: str, reason: str) -> str:
    _known_version(cfg, version)
    path = adapter_path(cfg, version)
    validate_adapter_dir(cfg, path)
    link_for_resolver(cfg, version, path)  # pinnable by name even before the next swap
    endpoints = cli_endpoints(cfg)
    if not endpoints:
        with _db(cfg) as db:
            prev = store_adapters.set_current(db, version, track=cfg.track, reason=reason)
        return (
            f"current adapter {prev or 'base'} -> {version}; vLLM is not running, so the"
            " daemon will serve it when it (re)starts (reconcile)"
        )
    swapper = Swapper(cfg, endpoints)
    try:
        with _db(cfg) as db:
            prev = store_adapters.current(db, cfg.track)
        result = swapper.promote(version, reason=reason)
    finally:
        swapper.close()
    return (
        f"current adapter {prev or 'base'} -> {version}; swapped on {len(endpoints)}"
        f" endpoint(s) in {result.seconds:.2f}s"
    )


def promote_version(cfg: Config, version: str, reason: str = "manual promote") -> str:
    """CLI ``promote``: swap ``version`` in (all endpoints or none), then move the pointer."""
    try:
        return _move_pointer(cfg, version, reason)
    except AdapterRejected as exc:
        raise SwapError(str(exc)) from exc


def rollback_version(cfg: Config, version: str | None = None) -> str:
    """CLI ``rollback``: back to ``version`` or to the promoted version before current."""
    target = _rollback_target(cfg, version)
    try:
        return _move_pointer(cfg, target, f"rollback to {target}")
    except AdapterRejected as exc:
        raise SwapError(str(exc)) from exc
