"""Build the configured policies, and the write helper the scheduling modules share.

The config already validated every policy table (``daemon.config.PolicyConfig`` stores
the effective tables, defaults filled in by the policy classes), so building here cannot
fail on a loaded config; it builds fresh instances per call because a tick is cheap and
the config may have been reloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.config import Config
from policies import base
from policies.base import PromotionPolicy, TriggerPolicy
from policies.selection import SelectionPolicy
from policies.trigger_tree import build_trigger


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
