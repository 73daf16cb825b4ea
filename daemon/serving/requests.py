"""``evergreen promote``/``rollback`` beside a running daemon: a request it performs.

The daemon holds the state dir's lock (:mod:`daemon.statelock`), so the CLI files a
request in the store (:mod:`store.requests`) and waits for the answer (:func:`ask_daemon`);
the daemon's main loop claims it (:func:`serve_requests`) and performs it with its own
swapper, so its metrics see the swap, then answers with the one line the CLI would have
printed (the same error text when it cannot: an unknown version, a rejected one without
``--force``). A request the daemon did not start before its timeout expires, never runs
late.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.serving import promotion
from daemon.serving.audit import store_db
from daemon.serving.swap import Swapper
from store import requests as store_requests

log = logging.getLogger("evergreen.requests")

POLL_S = 0.2
KINDS = ("promote", "rollback")


class RequestFailed(EvergreenError, RuntimeError):
    """The daemon answered no (its one-line reason), or did not answer in time."""


def ask_daemon(
    cfg: Config, kind: str, args: dict[str, Any], *, timeout_s: float, pid: int | None
) -> str:
    """File a ``kind`` request and wait up to ``timeout_s`` for the daemon's answer;
    returns its message, raises :class:`RequestFailed` with it when the request failed."""
    with store_db(cfg) as db:
        request_id = store_requests.submit(db, kind, args, track=cfg.track, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            row = store_requests.get(db, request_id)
            if row is not None and row["status"] in store_requests.FINISHED:
                if row["status"] == store_requests.DONE:
                    return str(row["message"])
                raise RequestFailed(str(row["message"]))
            time.sleep(POLL_S)
        who = f"the Evergreen daemon (pid {pid})" if pid else "the Evergreen daemon"
        if store_requests.expire_if_pending(
            db, request_id, f"the CLI gave up after {timeout_s:g} s"
        ):
            raise RequestFailed(
                f"{who} did not take the {kind} request within {timeout_s:g} s; nothing was"
                " done (is it stuck? see `evergreen status` and its log)"
            )
        raise RequestFailed(
            f"{who} is still performing the {kind} request after {timeout_s:g} s;"
            " see `evergreen adapters` for the outcome"
        )


def serve_requests(cfg: Config, db: sqlite_utils.Database, swapper: Swapper | None) -> int:
    """Perform every pending request (the daemon's main loop); returns how many. Never
    raises: a request that fails is answered with its reason, and a store error is logged."""
    done = 0
    try:
        while (row := store_requests.claim_next(db, track=cfg.track)) is not None:
            ok, message = _perform(cfg, row, swapper)
            store_requests.finish(db, int(row["id"]), ok, message)
            log.info("%s request %s: %s", row["kind"], row["id"], message)
            done += 1
    except Exception as exc:  # a busy store must not kill the main loop
        log.warning("operator requests: %s", exc)
    return done


def _perform(cfg: Config, row: dict[str, Any], swapper: Swapper | None) -> tuple[bool, str]:
    args, kind = row["args"], row["kind"]
    try:
        if kind == "promote":
            force = bool(args.get("force"))
            reason = "manual promote (forced past the gate)" if force else "manual promote"
            version = str(args["version"])
            done = promotion.promote(cfg, version, reason, swapper=swapper, force=force)
        elif kind == "rollback":
            done = promotion.rollback(cfg, args.get("version"), swapper=swapper)
        else:
            return False, f"unknown request {kind!r} (this daemon performs {', '.join(KINDS)})"
    except EvergreenError as exc:
        return False, " ".join(str(exc).split())
    except Exception as exc:
        log.exception("%s request %s failed", kind, row["id"])
        return False, f"the daemon failed to {kind}: {exc}"
    return True, done.message
