"""Selection of new data (active learning): which pending chunks a stage trains on first.

Under a per-stage token budget, ``highest_loss`` takes the pending chunks the current
model finds hardest (highest mean token loss in ``chunk_scores``) first; whatever does
not fit waits for the next stage. Unscored chunks follow the scored ones oldest first
(FIFO), and when nothing is scored the whole selection is FIFO, with a reason saying so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import Field

from policies.base import Pick, register
from policies.params import Params
from policies.units import NonNegInt, fmt_int

TOKEN_BUDGET = 200_000
BUDGET_HELP = "New tokens per stage (0 = all)."


@dataclass
class PendingChunk:
    """A pending train chunk with the facts selection may use."""

    chunk_id: int
    n_tokens: int
    created_at: float = 0.0
    loss: float | None = None  # under the current model; None = not scored yet
    attempts: int = 0


@runtime_checkable
class SelectionPolicy(Protocol):
    token_budget: int

    def plan(self, chunks: list[PendingChunk], rng: random.Random) -> Pick: ...


def take(ordered: list[PendingChunk], budget: int) -> tuple[list[int], int]:
    """Walk ``ordered`` taking chunks that fit (0 = no budget); always at least one chunk,
    so an oversized chunk cannot block the queue forever."""
    ids: list[int] = []
    used = 0
    for c in ordered:
        if budget and ids and used + c.n_tokens > budget:
            continue
        ids.append(c.chunk_id)
        used += c.n_tokens
        if budget and used >= budget:
            break
    return ids, used


def _fifo_key(c: PendingChunk) -> tuple[float, int]:
    return (c.created_at, c.chunk_id)


def _budget_note(budget: int, used: int, n_taken: int, n_all: int) -> str:
    cap = f"budget {fmt_int(budget)}" if budget else "no budget limit"
    waiting = n_all - n_taken
    tail = f"; {waiting} chunks wait for the next stage" if waiting else ""
    return f"{n_taken} of {n_all} pending chunks, {fmt_int(used)} tokens ({cap}){tail}"


class _Budgeted(Params):
    token_budget: NonNegInt = Field(TOKEN_BUDGET, description=BUDGET_HELP)


@register("selection", "fifo")
class Fifo(_Budgeted):
    """Oldest pending chunks first."""

    def plan(self, chunks: list[PendingChunk], rng: random.Random) -> Pick:
        ordered = sorted(chunks, key=_fifo_key)
        ids, used = take(ordered, self.token_budget)
        return Pick(
            ids,
            used,
            [f"fifo selection: {_budget_note(self.token_budget, used, len(ids), len(chunks))}"],
        )


@register("selection", "highest_loss", default=True)
class HighestLoss(_Budgeted):
    """Highest loss under the current model first (active learning); FIFO when unscored."""

    def plan(self, chunks: list[PendingChunk], rng: random.Random) -> Pick:
        scored = sorted(
            (c for c in chunks if c.loss is not None), key=lambda c: (-(c.loss or 0.0), c.chunk_id)
        )
        unscored = sorted((c for c in chunks if c.loss is None), key=_fifo_key)
        ids, used = take(scored + unscored, self.token_budget)
        note = _budget_note(self.token_budget, used, len(ids), len(chunks))
        reasons = [f"highest_loss selection: {note}"]
        if not scored:
            reasons.append("no pending chunk scored yet: oldest first (FIFO fallback)")
        else:
            chosen = set(ids)
            losses = [c.loss for c in scored if c.chunk_id in chosen and c.loss is not None]
            if losses:
                reasons.append(
                    f"{len(scored)} of {len(chunks)} pending chunks scored; chosen losses"
                    f" {max(losses):.3f} … {min(losses):.3f}"
                )
            if unscored:
                reasons.append(f"{len(unscored)} unscored chunks follow, oldest first")
        return Pick(ids, used, reasons)
