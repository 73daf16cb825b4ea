"""Build the configured policies, and the write helper the scheduling modules share.

The config already validated every policy table (``daemon.config.PolicyConfig`` stores
the effective tables, defaults filled in by the policy classes), so building here cannot
fail on a loaded config; it builds fresh instances per call because a tick is cheap and
the config may have been reloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any

import sqlite_utils

from daemon.config import Config
from policies import base
from policies.base import PromotionPolicy, TriggerPolicy
from policies.selection import SelectionPolicy
from policies.trigger_tree import build_trigger
from store.db import transaction


@dataclass
class Policies:
    """The four configured policies of one track."""

    trigger: TriggerPolicy
    replay: Any  # a ReplayPolicy from policies.replay (has .plan and .budget)
    promotion: PromotionPolicy
    selection: SelectionPolicy


def build_all(cfg: Config) -> Policies:
    """Instantiate every policy section of ``cfg.policy``."""
    pc = cfg.policy
    return Policies(
        trigger=build_trigger(pc.trigger, "policy.trigger"),
        replay=base.build("replay", pc.replay, "policy.replay"),
        promotion=base.build("promotion", pc.promotion, "policy.promotion"),
        selection=base.build("selection", pc.selection, "policy.selection"),
    )


_savepoints = count()


@contextmanager
def write(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction, or a savepoint inside the caller's one.

    The runner calls :func:`~daemon.scheduling.planning.after_reject` inside its own
    transaction; a savepoint makes this block all-or-nothing there too, without
    committing the caller's work. (Private stand-in until ``store.db`` grows a shared
    ``savepoint()``.)
    """
    if not db.conn.in_transaction:
        with transaction(db):
            yield
        return
    name = f"evergreen_sched_{next(_savepoints)}"
    db.conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        db.conn.execute(f"ROLLBACK TO {name}")
        db.conn.execute(f"RELEASE {name}")
        raise
    db.conn.execute(f"RELEASE {name}")
