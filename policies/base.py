"""The three policy Protocols, the Decision they return, and the registry.

SKELETON: the policies work (issue 5) fleshes this out; signatures here are the contract
the trainer, the daemon and ``evergreen status`` rely on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable


@dataclass
class Decision:
    """A verdict with human-readable reasons (written to events, shown by status)."""

    fire: bool
    reasons: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TriggerState:
    """A snapshot of what trigger policies may look at; built by policies.engine."""

    now: float
    pending_tokens: int = 0
    oldest_pending_at: float | None = None
    last_stage_at: float | None = None
    stage_running: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TriggerPolicy(Protocol):
    def evaluate(self, state: TriggerState) -> Decision: ...


@dataclass
class ReplayCandidate:
    chunk_id: int
    n_tokens: int
    stage_id: int | None = None
    added_at: float = 0.0
    source: str = ""
    learned_loss: float | None = None
    current_loss: float | None = None


@runtime_checkable
class ReplayPolicy(Protocol):
    ratio: float

    def select(
        self, candidates: list[ReplayCandidate], budget_tokens: int, rng: random.Random
    ) -> list[int]: ...


@runtime_checkable
class PromotionPolicy(Protocol):
    def decide(self, candidate: dict[str, float], baseline: dict[str, float]) -> Decision: ...


T = TypeVar("T")
_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {
    "trigger": {},
    "replay": {},
    "promotion": {},
    "selection": {},
}


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: ``@register("replay", "uniform")``; duplicates are rejected."""

    def deco(factory: T) -> T:
        reg = _REGISTRIES[kind]
        if name in reg:
            raise ValueError(f"{kind} policy {name!r} is already registered")
        reg[name] = factory  # type: ignore[assignment]
        return factory

    return deco


def get(kind: str, name: str) -> Callable[..., Any]:
    reg = _REGISTRIES[kind]
    if name not in reg:
        raise KeyError(f"unknown {kind} policy {name!r} (known: {', '.join(sorted(reg))})")
    return reg[name]
