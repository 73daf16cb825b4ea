"""The three policy Protocols, the Decision they return, and the registry.

Policies are pydantic models (:class:`policies.params.Params`) found by name
(``@register("replay", "uniform", default=True)``) and built from config tables
(``{name = "uniform", ratio = 2.0}``). The registry is the discriminated union over
``name`` for each kind: unlike a static ``Union[...]`` it also admits policies that
plugins register later, with the same guarantees (unknown names and parameters are
errors that name the key path, defaults come from the class). A table without ``name``
means the kind's default policy. Policies never touch the store or a model: they are pure
functions of a snapshot (:class:`TriggerState`, candidate lists) and a clock.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ValidationError

from policies.params import ParamError, explain, join_path

KINDS = ("trigger", "replay", "promotion", "selection", "augment")
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
    """A snapshot of what trigger policies may look at; built by ``daemon.scheduling``.

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


# ----------------------------------------------------------------------------- registry
T = TypeVar("T")
_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}
_DEFAULTS: dict[str, str] = {}


def register(kind: str, name: str, *, default: bool = False) -> Callable[[T], T]:
    """Class decorator: ``@register("replay", "uniform", default=True)``.

    Rejects unknown kinds, malformed or reserved names and duplicates at import time, so
    a clash between two plugins is a loud error rather than one silently shadowing the
    other. ``default=True`` makes it the policy a config table without ``name`` means.
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
        if default and kind in _DEFAULTS:
            raise ValueError(f"{kind} already has a default policy {_DEFAULTS[kind]!r}")
        reg[name] = factory  # type: ignore[assignment]
        if default:
            _DEFAULTS[kind] = name
        if isinstance(factory, type):
            factory.policy_name = name  # type: ignore[attr-defined]  # for reasons and plans
        return factory

    return deco


def unregister(kind: str, name: str) -> None:
    """Remove a registration (tests and plugin reloads only)."""
    _REGISTRIES[kind].pop(name, None)
    if _DEFAULTS.get(kind) == name:
        del _DEFAULTS[kind]


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


def default_name(kind: str) -> str | None:
    """The policy a table without ``name`` means (None: the kind has no default)."""
    _load_builtins()
    return _DEFAULTS.get(kind)


def _model(factory: Any) -> type[BaseModel] | None:
    return factory if isinstance(factory, type) and issubclass(factory, BaseModel) else None


def describe(kind: str, name: str) -> dict[str, str]:
    """Parameter name -> help text of a registered policy (for docs and errors)."""
    model = _model(get(kind, name))
    if model is None:
        return {}
    return {k: f.description or "" for k, f in model.model_fields.items()}


def _resolve(kind: str, spec: Any, path: str) -> tuple[str, dict[str, Any]]:
    """(policy name, parameters) of a config table; a table without name = the default."""
    _load_builtins()
    if not isinstance(spec, dict):
        raise ParamError(path, f"must be a table like {{name = ...}}, got {spec!r}")
    known = ", ".join(sorted(_REGISTRIES[kind]))
    name = spec.get("name", _DEFAULTS.get(kind))
    if name is None:
        raise ParamError(join_path(path, "name"), f"missing {kind} policy name (known: {known})")
    if not isinstance(name, str) or name not in _REGISTRIES[kind]:
        raise ParamError(
            join_path(path, "name"), f"unknown {kind} policy {name!r} (known: {known})"
        )
    return name, {k: v for k, v in spec.items() if k != "name"}


def build(kind: str, spec: Any, path: str = "") -> Any:
    """Instantiate the policy a config table names; every error is a :class:`ParamError`
    whose path starts with ``path`` (``policy.replay.ratio: must be ...``)."""
    name, params = _resolve(kind, spec, path)
    factory = _REGISTRIES[kind][name]
    model = _model(factory)
    if model is None:  # a plain callable plugin: no parameter schema to check against
        try:
            return factory(**params)
        except (TypeError, ValueError) as exc:
            raise ParamError(path, str(exc)) from None
    fields = model.model_fields
    for key in params:
        if key not in fields:
            raise ParamError(
                join_path(path, key),
                f"unknown parameter of {kind} policy {name!r}"
                f" (known: {', '.join(sorted(fields)) or 'none'})",
            )
    for key, f in fields.items():
        if f.is_required() and key not in params:
            raise ParamError(
                join_path(path, key),
                f"required parameter of {kind} policy {name!r} is missing ({f.description})",
            )
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        where, problem = explain(exc, model)
        raise ParamError(join_path(path, where), problem) from None


def with_defaults(kind: str, spec: Any, path: str = "") -> dict[str, Any]:
    """The effective table: validated, ``name`` set, every parameter present.

    What the config stores and ``evergreen config show`` prints, so the defaults it shows
    are the class's. Given values are kept as written ("5m" stays "5m"); a missing one is
    the class default as validated (Window's ``"2h"`` shows as 7200.0 seconds).
    """
    policy = build(kind, spec, path)
    name, params = _resolve(kind, spec, path)
    if not isinstance(policy, BaseModel):
        return {"name": name, **params}
    dumped = policy.model_dump()
    out: dict[str, Any] = {"name": name}
    for key in type(policy).model_fields:
        value = params.get(key, dumped.get(key))
        if value is not None:
            out[key] = value
    return out


_builtins_loaded = False


def _load_builtins() -> None:
    """Import the shipped policy modules once, so their ``@register`` calls have run."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from policies import augment, promotion, replay, selection, triggers  # noqa: F401
