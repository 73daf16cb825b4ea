"""The three policy Protocols, the Decision they return, parameters, and the registry.

Policies are small dataclasses found by name (``@register("replay", "uniform")``) and
built from config tables (``{name = "uniform", ratio = 0.5}``). Every parameter is a
:func:`param` field with a checker, so the same check runs whether a policy is built from
a TOML file (where a failure becomes ``ConfigError("policy.replay.ratio", ...)``) or
directly from Python (tests, benchmarks). Policies never touch the store or a model: they
are pure functions of a snapshot (:class:`TriggerState`, candidate lists) and a clock.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import Any, Protocol, TypeVar, runtime_checkable

from daemon.config import ConfigError

KINDS = ("trigger", "replay", "promotion", "selection")
# Names are config identifiers: lower snake case, short. "all"/"any" are combinators.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
RESERVED = {"trigger": ("all", "any")}


@dataclass
class Decision:
    """A verdict with human-readable reasons (written to events, shown by status).

    ``data`` carries machine-readable facts: ``due_at`` (epoch seconds at which a
    time-based condition becomes true), ``policy`` (the leaf's name), ``children``.
    """

    fire: bool
    reasons: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """One line for humans; combinators build it from their children."""
        return str(self.data.get("summary") or "; ".join(self.reasons))


@dataclass
class TriggerState:
    """A snapshot of what trigger policies may look at; built by :mod:`policies.engine`.

    Everything that needs I/O (scores from the scorer subprocess, vLLM ``/metrics``,
    free memory) is fetched by the engine and passed in here, so policies stay pure and
    are tested with a fake clock and hand-written states.
    """

    now: float
    pending_tokens: int = 0
    oldest_pending_at: float | None = None
    last_stage_at: float | None = None
    stage_running: bool = False
    tz: tzinfo = UTC
    # Mean loss (nats/token, token-weighted) of pending train data under the current
    # model, and the share of pending tokens that has a score; None = nothing scored.
    pending_loss: float | None = None
    pending_scored_fraction: float = 0.0
    # Mean loss of holdout chunks of already-learned documents; None = none scored/learned.
    learned_holdout_loss: float | None = None
    learned_holdout_chunks: int = 0
    # The last stretch the daemon was not evaluating triggers (down): (start, end).
    last_gap: tuple[float, float] | None = None
    # Running requests per serving endpoint (None = unreachable); None = not measured.
    serving_running: dict[str, float | None] | None = None
    # Available memory in bytes (psutil); None = not measured.
    free_memory_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TriggerPolicy(Protocol):
    """When to start a stage. ``evaluate`` must not do I/O and must explain itself."""

    def evaluate(self, state: TriggerState) -> Decision: ...


@dataclass
class ReplayCandidate:
    """A chunk in the replay buffer, with what replay policies may weigh."""

    chunk_id: int
    n_tokens: int
    stage_id: int | None = None
    added_at: float = 0.0
    source: str = ""
    learned_loss: float | None = None
    current_loss: float | None = None


@dataclass
class Pick:
    """What a replay or selection policy chose, and why."""

    chunk_ids: list[int]
    tokens: int
    reasons: list[str] = field(default_factory=list)


@runtime_checkable
class ReplayPolicy(Protocol):
    """What old data to mix in. ``ratio`` = replay tokens / new tokens of the stage.

    ``select`` fills at most ``budget_tokens`` (the same budget semantics for every
    policy: walk the policy's order, take each chunk that still fits), so two replay
    policies given the same budget are directly comparable.
    """

    ratio: float

    def select(
        self, candidates: list[ReplayCandidate], budget_tokens: int, rng: random.Random
    ) -> list[int]: ...


@runtime_checkable
class PromotionPolicy(Protocol):
    """The gate: ``fire`` = promote. Reasons name every failing criterion."""

    def decide(self, candidate: dict[str, float], baseline: dict[str, float]) -> Decision: ...


# ----------------------------------------------------------------------------- parameters
Check = Callable[[Any], Any]


def param(check: Check, default: Any = dataclasses.MISSING, *, help: str) -> Any:
    """A policy parameter: ``check`` validates and converts a raw (TOML) value.

    ``check`` raises ``ValueError("must be ...")``; the loader turns that into a
    :class:`ConfigError` whose path ends with the parameter's name.
    """
    meta = {"help": help, "check": check}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Params:
    """Mixin for policy dataclasses: runs every :func:`param` check in ``__post_init__``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is None or not f.init:
                continue
            try:
                setattr(self, f.name, check(getattr(self, f.name)))
            except ValueError as exc:
                raise ConfigError(f.name, str(exc)) from None
        self.validate()

    def validate(self) -> None:
        """Cross-parameter checks (override); raise ConfigError(param_name, problem)."""


# ----------------------------------------------------------------------------- registry
T = TypeVar("T")
_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: ``@register("replay", "uniform")``.

    Rejects unknown kinds, malformed or reserved names and duplicates at import time, so
    a clash between two plugins is a loud error rather than one silently shadowing the
    other.
    """
    if kind not in _REGISTRIES:
        raise ValueError(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"malformed {kind} policy name {name!r}: use lower_snake_case, at most 64 chars"
        )
    if name in RESERVED.get(kind, ()):
        raise ValueError(f"{kind} policy name {name!r} is reserved for a combinator")

    def deco(factory: T) -> T:
        reg = _REGISTRIES[kind]
        if name in reg:
            raise ValueError(f"{kind} policy {name!r} is already registered")
        reg[name] = factory  # type: ignore[assignment]
        if isinstance(factory, type):
            factory.policy_name = name  # type: ignore[attr-defined]  # for reasons and plans
        return factory

    return deco


def unregister(kind: str, name: str) -> None:
    """Remove a registration (tests and plugin reloads only)."""
    _REGISTRIES[kind].pop(name, None)


def get(kind: str, name: str) -> Callable[..., Any]:
    _load_builtins()
    if kind not in _REGISTRIES:
        raise KeyError(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")
    reg = _REGISTRIES[kind]
    if name not in reg:
        raise KeyError(f"unknown {kind} policy {name!r} (known: {', '.join(sorted(reg))})")
    return reg[name]


def names(kind: str) -> list[str]:
    _load_builtins()
    return sorted(_REGISTRIES[kind])


def describe(kind: str, name: str) -> dict[str, str]:
    """Parameter name -> help text of a registered policy (for docs and errors)."""
    factory = get(kind, name)
    if not dataclasses.is_dataclass(factory):
        return {}
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(factory)}


def build(kind: str, spec: Any, path: str) -> Any:
    """Instantiate the policy a config table names; every error carries the key path."""
    _load_builtins()
    if not isinstance(spec, dict):
        raise ConfigError(path, f"must be a table like {{name = ...}}, got {spec!r}")
    name = spec.get("name")
    known = ", ".join(sorted(_REGISTRIES[kind]))
    if name is None:
        raise ConfigError(f"{path}.name", f"missing {kind} policy name (known: {known})")
    if not isinstance(name, str) or name not in _REGISTRIES[kind]:
        raise ConfigError(f"{path}.name", f"unknown {kind} policy {name!r} (known: {known})")
    factory = _REGISTRIES[kind][name]
    params = {k: v for k, v in spec.items() if k != "name"}
    if dataclasses.is_dataclass(factory):
        fields = {f.name: f for f in dataclasses.fields(factory) if f.init}
        for key in params:
            if key not in fields:
                raise ConfigError(
                    f"{path}.{key}",
                    f"unknown parameter of {kind} policy {name!r}"
                    f" (known: {', '.join(sorted(fields)) or 'none'})",
                )
        for fname, f in fields.items():
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default and fname not in params:
                raise ConfigError(
                    f"{path}.{fname}",
                    f"required parameter of {kind} policy {name!r} is missing"
                    f" ({f.metadata.get('help', '')})",
                )
    try:
        return factory(**params)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc.path}" if exc.path else path, exc.problem) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, str(exc)) from None


_builtins_loaded = False


def _load_builtins() -> None:
    """Import the shipped policy modules once, so their ``@register`` calls have run."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from policies import promotion, replay, selection, triggers  # noqa: F401
