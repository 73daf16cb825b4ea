"""The replica fleet: which vLLM endpoints the swapper serves, recomputed at every reconcile.

A replica is one vLLM server (one base URL). The set comes from

* ``serving.endpoints``: base URLs, as written;
* ``serving.endpoints_dns``: names (``http://vllm.internal:8000``) resolved with
  ``getaddrinfo`` at every reconcile, one replica per address, so a replica added to (or
  removed from) DNS joins (or leaves) within one ``serving.reconcile_interval_s``. A name
  that fails to resolve keeps its last answer: a DNS hiccup must not empty the fleet;
* a config reload (``SIGHUP`` to the daemon): :meth:`Fleet.request_reload` is all the signal
  handler does; the next reconcile re-reads the file and takes ``serving.endpoints`` and
  ``serving.endpoints_dns`` from it (other keys need a restart, and the log says so).

What each replica serves is kept in the store (``kv``, one JSON row per track) after every
reconcile and swap, so ``evergreen status`` shows the fleet without asking the daemon.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlite_utils

from daemon.config import Config, ServingConfig
from daemon.errors import EvergreenError
from daemon.serving.audit import record_event, store_db
from daemon.serving.client import VLLMError
from store import kv

if TYPE_CHECKING:
    from daemon.serving.swap import Swapper

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]  # (name, port) -> addresses
REPLICAS_KEY = "serving.replicas"  # + ":<track>"
RELOADED_KEYS = ("endpoints", "endpoints_dns")


@dataclass
class EndpointState:
    """What the swapper last saw on one endpoint (read by metrics and ``status``)."""

    name: str
    url: str
    up: bool = False
    serving: str | None = None  # version behind the stable name, "base", or None if unknown
    last_error: str = ""
    checked_at: float = 0.0


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), in resolver order, no duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


class Fleet:
    """The endpoint sources of external mode; :meth:`urls` is the fleet right now."""

    def __init__(self, serving: ServingConfig, resolve: Resolver = resolve_addresses) -> None:
        self.serving = serving
        self.resolve = resolve
        self.last_answer: dict[str, list[str]] = {}  # endpoints_dns entry -> last good URLs
        self.dns_errors: dict[str, str] = {}
        self._reload: Callable[[], Config] | None = None
        self._lock = threading.Lock()

    def request_reload(self, loader: Callable[[], Config]) -> None:
        """Re-read the config at the next :meth:`urls` (safe to call from a signal handler:
        it only stores the loader)."""
        self._reload = loader

    def _apply_reload(self) -> None:
        loader, self._reload = self._reload, None
        if loader is None:
            return
        try:
            new = loader().serving
        except (EvergreenError, OSError) as exc:
            log.error("config reload failed, keeping the current endpoints: %s", exc)
            return
        old = self.serving
        ignored = [
            k
            for k in type(old).model_fields
            if k not in RELOADED_KEYS and getattr(old, k) != getattr(new, k)
        ]
        if ignored:
            log.warning(
                "config reload: only serving.endpoints and serving.endpoints_dns are reloaded;"
                " restart the daemon for serving.%s",
                ", serving.".join(ignored),
            )
        self.serving = old.model_copy(update={k: getattr(new, k) for k in RELOADED_KEYS})
        log.info(
            "config reloaded: endpoints %s, endpoints_dns %s",
            self.serving.endpoints,
            self.serving.endpoints_dns,
        )

    def _resolve_entry(self, entry: str) -> list[str]:
        parts = urlsplit(entry if "://" in entry else f"http://{entry}")
        host, port = parts.hostname or "", parts.port or 80
        try:
            addresses = self.resolve(host, port)
        except OSError as exc:
            if self.dns_errors.get(entry) != str(exc):
                log.warning("cannot resolve %s (%s); keeping its last answer", entry, exc)
            self.dns_errors[entry] = str(exc)
            return self.last_answer.get(entry, [])
        self.dns_errors.pop(entry, None)
        urls = [_url(parts.scheme, a, port) for a in addresses]
        self.last_answer[entry] = urls
        return urls

    def urls(self) -> list[str]:
        """The fleet now: configured URLs, then every address of every DNS name."""
        with self._lock:
            self._apply_reload()
            found = [u.rstrip("/") for u in self.serving.endpoints]
            for entry in self.serving.endpoints_dns:
                found.extend(self._resolve_entry(entry))
            return list(dict.fromkeys(found))


def sync(swapper: Swapper, *, strict: bool = False) -> tuple[list[str], list[str]]:
    """Make the swapper's endpoint set the fleet's now: (joined, left) endpoint names.

    A replica that joins starts unknown (not up, serving nothing): the reconcile that follows
    serves it the current adapter. A URL the client refuses (non-loopback without a key)
    raises if ``strict`` (start-up: a config error), else is logged and left out.
    """
    if swapper.fleet is None or swapper.make_client is None:
        return [], []
    with swapper.lock:
        urls = swapper.fleet.urls()
        have = {ep.base_url for ep in swapper.endpoints}
        joined: list[str] = []
        for url in urls:
            if url in have:
                continue
            try:
                ep = swapper.make_client(url)
            except VLLMError as exc:
                if strict:
                    raise
                log.error("replica %s left out: %s", url, exc)
                continue
            if ep.name in swapper.states:  # the same host:port under another URL
                ep.close()
                continue
            swapper.endpoints.append(ep)
            swapper.states[ep.name] = EndpointState(ep.name, ep.base_url)
            joined.append(ep.name)
        gone = [ep for ep in swapper.endpoints if ep.base_url not in urls]
        for ep in gone:
            swapper.endpoints.remove(ep)
            swapper.states.pop(ep.name, None)
            swapper.last_reconcile_error.pop(ep.name, None)
            if swapper.owns_endpoints:
                ep.close()
        left = [ep.name for ep in gone]
        if swapper.synced and (joined or left):
            _record_membership(swapper, joined, left)
        swapper.synced = True
        return joined, left


def _record_membership(swapper: Swapper, joined: list[str], left: list[str]) -> None:
    changes = (("joined", joined), ("left", left))
    message = "; ".join(f"{what}: {', '.join(names)}" for what, names in changes if names)
    log.info("fleet changed: %s", message)
    record_event(
        swapper.cfg,
        "serving.fleet_changed",
        message,
        "",
        {"joined": joined, "left": left, "size": len(swapper.endpoints)},
    )


def replica_rows(swapper: Swapper) -> list[dict[str, Any]]:
    """One row per endpoint: name, up, the version its stable name serves, last error."""
    return [
        {
            "endpoint": s.name,
            "up": s.up,
            "serving": s.serving,
            "error": s.last_error,
            "checked_at": round(s.checked_at, 3),
        }
        for s in swapper.states.values()
    ]


# -- what each replica serves, for `evergreen status` -------------------------------------------
def save_replicas(cfg: Config, rows: list[dict[str, Any]]) -> None:
    """Store the swapper's view of each replica (logged, never raised, on a busy store)."""
    try:
        with store_db(cfg) as db:
            kv.put(db, f"{REPLICAS_KEY}:{cfg.track}", json.dumps(rows))
    except Exception as exc:
        log.warning("could not store the replica states: %s", exc)


def load_replicas(db: sqlite_utils.Database, track: str) -> list[dict[str, Any]]:
    """The replica rows the daemon stored last ([] before its first reconcile)."""
    raw = kv.get(db, f"{REPLICAS_KEY}:{track}")
    try:
        rows = json.loads(raw) if raw else []
    except ValueError:
        return []
    return rows if isinstance(rows, list) else []
