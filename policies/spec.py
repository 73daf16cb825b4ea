"""Build the configured policies, and validate them when a config is loaded.

``daemon.config.from_dict`` imports this module lazily, which registers :func:`validate`
through ``daemon.config.register_validator``; so a typo in a policy name or parameter
fails at startup (and in ``evergreen config check``) with the exact key path, e.g.
``policy.trigger.all[1].any[0].n: must be a positive integer, got -3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon import config as config_mod
from policies import base
from policies.triggers import build_trigger

if TYPE_CHECKING:
    from daemon.config import Config
    from policies.base import PromotionPolicy, TriggerPolicy
    from policies.selection import SelectionPolicy


@dataclass
class Policies:
    """The four configured policies of one track."""

    trigger: TriggerPolicy
    replay: Any  # a ReplayPolicy from policies.replay (has .plan and .budget)
    promotion: PromotionPolicy
    selection: SelectionPolicy


def _named(section: str, spec: Any) -> Any:
    """A table without ``name`` means the default policy of that section, so tuning one
    threshold (``[policy.promotion] max_eval_drop_points = 2``) needs no boilerplate."""
    if isinstance(spec, dict) and "name" not in spec:
        default = getattr(config_mod.PolicyConfig(), section)
        return {"name": default["name"], **spec}
    return spec


def build_all(cfg: Config) -> Policies:
    """Instantiate every policy section; raises ConfigError with the key path."""
    pc = cfg.policy
    return Policies(
        trigger=build_trigger(pc.trigger, "policy.trigger"),
        replay=base.build("replay", _named("replay", pc.replay), "policy.replay"),
        promotion=base.build("promotion", _named("promotion", pc.promotion), "policy.promotion"),
        selection=base.build("selection", _named("selection", pc.selection), "policy.selection"),
    )


def validate(cfg: Config) -> None:
    """The config-load hook: building everything is the validation."""
    build_all(cfg)


if validate not in config_mod._validators:
    config_mod.register_validator(validate)
