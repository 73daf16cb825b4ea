"""Short-lived store access for serving: swaps and reconciles run on threads (the main loop,
the stage worker, the CLI) that do not own a connection, and their outcome is recorded as an
event without letting a busy store turn a swap outcome into a crash."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import sqlite_utils

from daemon.config import Config
from store import events
from store.db import open_db

log = logging.getLogger(__name__)


@contextlib.contextmanager
def store_db(cfg: Config) -> Iterator[sqlite_utils.Database]:
    """A connection to the store for one short piece of work, always closed."""
    db = open_db(cfg.db_path)
    try:
        yield db
    finally:
        db.conn.close()


def record_event(cfg: Config, kind: str, message: str, version: str, data: dict[str, Any]) -> None:
    """Record a serving event; a failure to record is logged, never raised."""
    try:
        with store_db(cfg) as db:
            events.record(db, kind, message, subject=version, track=cfg.track, data=data)
    except Exception:
        log.exception("could not record %s event", kind)
