"""Promotion: the one place where the store's current adapter changes.

A promotion is "swap, then move the pointer": the gate path of a stage (through the callable
that ``daemon/service.py`` and ``daemon/cli.py`` hand to the runner), ``evergreen promote``,
``evergreen rollback`` and ``evergreen train --now`` all call :func:`promote`. It

1. refuses an unknown version, one of another track, or one the gate rejected;
2. validates the adapter dir (inside the state dir, safetensors only) and links it for
   vLLM's resolver, so the version is pinnable by name even before a swap;
3. swaps it in on every endpoint, or on none (:meth:`Swapper.swap_to`): with the daemon's
   own swapper when given, else on the endpoints the CLI can reach now; with no endpoint up
   (or ``swap=False``) the pointer moves alone and the daemon's reconcile serves it later;
4. only after a successful swap, moves the pointer (an ``adapter.current`` event).

A swap that fails raises :class:`SwapError` and leaves the pointer where it was. The
swapper's lock is held across 3 and 4, so a reconcile cannot flip the alias back in between.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.config import Config
from daemon.serving.adapters import (
    AdapterRejected,
    adapter_path,
    link_for_resolver,
    validate_adapter_dir,
)
from daemon.serving.apikey import load_or_create_admin_secret, load_or_create_api_key
from daemon.serving.audit import store_db
from daemon.serving.client import VLLMClient
from daemon.serving.swap import NoEndpointUp, SwapError, Swapper, SwapResult
from store import adapters as store_adapters


@dataclass(frozen=True)
class Promotion:
    """What a promotion did: the version now current, the one before, and the swap (None
    when the pointer moved without one)."""

    version: str
    previous: str | None
    swap: SwapResult | None
    message: str


def promote(
    cfg: Config,
    version: str,
    reason: str,
    *,
    swapper: Swapper | None = None,
    swap: bool = True,
    force: bool = False,
) -> Promotion:
    """Make ``version`` current: swap it in (all endpoints or none), then move the pointer.

    ``swapper`` is the daemon's (its metrics see the swap); without one, the endpoints the
    CLI can reach now are used. ``swap=False`` moves the pointer only (``train --no-swap``).
    ``force`` overrides the gate's rejection (an operator's call: ``promote --force``).
    Raises :class:`SwapError` (pointer unchanged) when the version cannot be served.
    """
    _check_promotable(cfg, version, force=force)
    if swap and swapper is not None:
        return _swap_and_move(cfg, swapper, version, reason)  # the swap validates the dir
    endpoints = cli_endpoints(cfg) if swap else []
    if endpoints:
        own = Swapper(cfg, endpoints, owns_endpoints=True)
        try:
            return _swap_and_move(cfg, own, version, reason)
        finally:
            own.close()
    try:
        path = adapter_path(cfg, version)
        validate_adapter_dir(cfg, path)
        link_for_resolver(cfg, version, path)  # pinnable by name once vLLM (re)starts
    except AdapterRejected as exc:
        raise SwapError(str(exc)) from exc
    if not swap:
        return _move_pointer(cfg, version, reason, None, "serving untouched (--no-swap)")
    why = "vLLM is not running, so the daemon will serve it when it (re)starts (reconcile)"
    if cfg.serving.mode == "none":
        why = "no serving (serving.mode = none)"
    return _move_pointer(cfg, version, reason, None, why)


def rollback(
    cfg: Config,
    version: str | None = None,
    *,
    swapper: Swapper | None = None,
    swap: bool = True,
) -> Promotion:
    """Back to ``version``, or to the promoted version before the current one."""
    target = rollback_target(cfg, version)
    return promote(cfg, target, f"rollback to {target}", swapper=swapper, swap=swap)


def _swap_and_move(cfg: Config, swapper: Swapper, version: str, reason: str) -> Promotion:
    with swapper.lock:
        try:
            result = swapper.swap_to(version, reason=reason)  # SwapError: pointer unchanged
        except NoEndpointUp as exc:
            # vLLM restarting (40-70 s on a busy CPU box) or the whole fleet down: the
            # version is valid (swap_to checked its dir first), so it becomes current as it
            # would with vLLM not running at all, and the reconcile after the restart serves
            # it. Failing here would throw away a candidate that passed its gate.
            link_for_resolver(cfg, version, adapter_path(cfg, version))
            return _move_pointer(
                cfg, version, reason, None, f"{exc}: the reconcile serves it when one is back"
            )
        total = len(swapper.endpoints)
        n = total - len(result.skipped)
        where = (
            f"{n} of {total} endpoint(s) (the others down)"
            if result.skipped
            else f"{n} endpoint(s)"
        )
        how = f"swapped on {where} in {result.seconds:.2f}s"
        return _move_pointer(cfg, version, reason, result, how)


def _move_pointer(
    cfg: Config, version: str, reason: str, result: SwapResult | None, how: str
) -> Promotion:
    with store_db(cfg) as db:
        previous = store_adapters.set_current(db, version, track=cfg.track, reason=reason)
    message = f"current adapter {previous or 'base'} -> {version}; {how}"
    return Promotion(version, previous, result, message)


def _check_promotable(cfg: Config, version: str, *, force: bool = False) -> None:
    with store_db(cfg) as db:
        row = store_adapters.get(db, version)
    if row is None or row["track"] != cfg.track:
        raise SwapError(f"unknown adapter version {version!r} on track {cfg.track!r}")
    if row["status"] == store_adapters.REJECTED and not force:
        raise SwapError(
            f"adapter {version} was rejected by the promotion gate (--force promotes it anyway)"
        )


def rollback_target(cfg: Config, version: str | None) -> str:
    """``version`` if given, else the promoted version just before the current one."""
    if version:
        return version
    with store_db(cfg) as db:
        current = store_adapters.current(db, cfg.track)
        if current is None:
            raise SwapError("nothing to roll back: no adapter is current")
        target = store_adapters.previous_promoted(db, cfg.track, current)
    if target is None:
        raise SwapError(f"no promoted version before {current} to roll back to")
    return target


def cli_endpoints(cfg: Config) -> list[VLLMClient]:
    """Endpoints reachable now: external ones, or the managed server if it is up."""
    mode = cfg.serving.mode
    if mode == "none":
        return []
    if mode == "external":
        return Swapper.from_config(cfg).endpoints
    host = f"[{cfg.serving.host}]" if ":" in cfg.serving.host else cfg.serving.host
    key_file = cfg.api_key_path
    if not cfg.serving.api_key and not key_file.exists():
        return []  # the managed server never ran in this state dir
    ep = VLLMClient(
        f"http://{host}:{cfg.serving.port}",
        load_or_create_api_key(cfg),
        timeout=cfg.serving.request_timeout_s,
        admin_secret=load_or_create_admin_secret(cfg),
    )
    if not ep.health(timeout=2.0):
        ep.close()
        return []
    return [ep]
