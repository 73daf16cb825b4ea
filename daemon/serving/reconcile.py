"""Reconcile: make each vLLM endpoint serve the store's current adapter again.

Run at startup, every ``serving.reconcile_interval_s`` and right after a managed vLLM
restart (which loses every loaded adapter). First the endpoint set is brought up to date
(:func:`daemon.serving.fleet.sync`: a replica that joined is reconciled in the same pass).
Per endpoint and in parallel, not all-or-none like a swap: one endpoint that is down must not
keep the others from being repaired. It never moves the store's pointer; it follows it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.serving.adapters import BASE_VERSION, AdapterRejected, adapter_path, served_name
from daemon.serving.audit import record_event, store_db
from daemon.serving.client import VLLMClient, VLLMError
from daemon.serving.fleet import save_replicas
from store import adapters as store_adapters

if TYPE_CHECKING:
    from daemon.serving.swap import Swapper

log = logging.getLogger(__name__)

MAX_PARALLEL = 32  # endpoints reconciled at once


def wanted_version(swapper: Swapper) -> str:
    """The store's current version for the swapper's track (``base`` when none)."""
    with store_db(swapper.cfg) as db:
        return store_adapters.current(db, swapper.cfg.track) or BASE_VERSION


def reconcile(swapper: Swapper) -> dict[str, str]:
    """Bring each endpoint's stable name to the store's current version; per endpoint.

    Returns ``{endpoint: "ok" | "restored" | "down" | "error: ..."}``. An endpoint that
    restarted and lost its adapters is restored here. Failures are recorded once per
    distinct error (``swap.failed``), not on every period.
    """
    with swapper.lock:
        swapper.sync_endpoints()  # external mode: the fleet as config, DNS and SIGHUP say now
        want = wanted_version(swapper)
        name = served_name(swapper.cfg, want)
        endpoints = list(swapper.endpoints)
        target = _target(swapper, want) if endpoints else None  # once, not per replica

        def one(ep: VLLMClient) -> str:
            return _reconcile_one(swapper, ep, want, name, target)

        if len(endpoints) <= 1:
            outcome = {ep.name: one(ep) for ep in endpoints}
        else:  # at once: one slow or down replica must not delay the others
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(endpoints))) as pool:
                names = [ep.name for ep in endpoints]
                outcome = dict(zip(names, pool.map(one, endpoints), strict=True))
        save_replicas(swapper.cfg, swapper.replica_rows())
        return outcome


def _target(swapper: Swapper, want: str) -> Path | Exception:
    """The checked dir of ``want`` (built once for ``base``), or why it cannot be served."""
    try:
        return swapper.target(want)
    except (AdapterRejected, OSError) as exc:
        return exc


def _reconcile_one(
    swapper: Swapper, ep: VLLMClient, want: str, name: str, target: Path | Exception | None
) -> str:
    st = swapper.states[ep.name]
    st.checked_at = time.time()
    if not ep.health():
        st.up, st.serving = False, None
        return "down"
    st.up = True
    try:
        registry = ep.aliases()
        repair_pinned(swapper, ep, registry)
        alias = registry.get(swapper.stable)
        if not isinstance(target, Path):
            raise target or AdapterRejected(f"no adapter dir for {want}")
        path = target
        if alias and alias.get("target") == name and Path(alias["path"]).resolve() == path:
            st.serving, st.last_error = want, ""
            swapper.last_reconcile_error.pop(ep.name, None)
            return "ok"
        _, _, expected = swapper.prepare(ep, name, path)
        swapper.flip(ep, name)
        swapper.verify(ep, expected)
    except (VLLMError, AdapterRejected, OSError) as exc:
        _failed(swapper, ep, want, exc)
        return f"error: {exc}"
    st.serving, st.last_error = want, ""
    swapper.last_reconcile_error.pop(ep.name, None)
    record_event(
        swapper.cfg,
        "swap.reconciled",
        f"{ep.name}: {swapper.stable} restored to {name}",
        want,
        {"endpoint": ep.name, "previous": (alias or {}).get("target")},
    )
    log.info("reconcile: %s now serves %s as %s", ep.name, name, swapper.stable)
    return "restored"


def _pinned_problem(swapper: Swapper, key: str, entry: dict[str, str]) -> str:
    """Why the pinned name ``key`` does not serve its own version's dir ("" if it does)."""
    version = key[len(swapper.stable) + 1 :]
    if entry.get("target") != key:
        return f"{key} is an alias of {entry.get('target')}"
    try:
        want = adapter_path(swapper.cfg, version)
    except AdapterRejected as exc:
        return str(exc)
    if Path(entry.get("path", "")).resolve() != want:
        return f"{key} serves {entry.get('path')}, not {want}"
    return ""


def repair_pinned(swapper: Swapper, ep: VLLMClient, registry: dict[str, dict[str, str]]) -> int:
    """Unload every pinned name (``<model>-vNNNN``, ``<model>-base``) that does not serve its
    own version's dir; vLLM's resolver loads the right one on its next use. Returns how many."""
    repaired = 0
    for key, entry in list(registry.items()):
        if not key.startswith(swapper.stable + "-"):
            continue
        problem = _pinned_problem(swapper, key, entry)
        if not problem:
            continue
        ep.unload_lora(key)
        registry.pop(key)
        repaired += 1
        log.warning("reconcile: %s: %s; unloaded", ep.name, problem)
        record_event(
            swapper.cfg,
            "swap.pinned_repaired",
            f"{ep.name}: {problem}; unloaded",
            key[len(swapper.stable) + 1 :],
            {"endpoint": ep.name, "name": key, "problem": problem},
        )
    return repaired


def _failed(swapper: Swapper, ep: VLLMClient, want: str, exc: Exception) -> None:
    """Remember the error on the endpoint; record it once per distinct error."""
    st = swapper.states[ep.name]
    st.last_error = str(exc)
    st.serving = None
    if swapper.last_reconcile_error.get(ep.name) != str(exc):
        swapper.last_reconcile_error[ep.name] = str(exc)
        record_event(
            swapper.cfg,
            "swap.failed",
            f"reconcile {ep.name} to {want} failed: {exc}",
            want,
            {"stage": "reconcile", "endpoint": ep.name, "error": str(exc)},
        )
    log.warning("reconcile %s to %s failed: %s", ep.name, want, exc)
