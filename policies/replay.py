"""Replay policies: which old chunks to mix into a stage, and how many.

All policies share one budget rule so they are comparable at the same replay budget
(``budget_tokens = ratio × new tokens``): each policy only decides an *order* over the
candidates; :func:`fill` then walks that order and takes every chunk that still fits.
``select(candidates, budget_tokens, rng)`` returns chunk ids (what benchmarks call);
``plan(...)`` returns the same ids plus the reasons that go into the stage plan.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from policies.base import Pick, ReplayCandidate, register
from policies.params import Params
from policies.units import Fraction, PositiveFloat, fmt_int, nonneg_float

# The continual benchmark's recipe (benchmarks/continual.py): 2 replay tokens per new token
# kept recall of 4 sequential domains at 1.0. A stage sized by training.passes (or held
# at training.min_steps) trains the same number of tokens either way, so replay displaces
# extra repetitions of the new data instead of adding compute; a stage sized by
# ``epochs`` (passes = 0) trains (1 + ratio)x its new tokens.
DEFAULT_RATIO = 2.0
RATIO_HELP = "Replay tokens per new token of the stage (see DEFAULT_RATIO on the cost)."


def _ratio(value: object) -> float:
    r = nonneg_float(value)
    if r > 100:
        raise ValueError(f"must be at most 100 (replay tokens per new token), got {value!r}")
    return r


Ratio = Annotated[float, BeforeValidator(_ratio)]


def fill(ordered: Iterable[ReplayCandidate], budget_tokens: int) -> tuple[list[int], int]:
    """Take candidates in order while they fit in ``budget_tokens``; (ids, tokens used)."""
    ids: list[int] = []
    used = 0
    for c in ordered:
        if used >= budget_tokens:
            break
        if c.n_tokens <= 0 or used + c.n_tokens > budget_tokens:
            continue
        ids.append(c.chunk_id)
        used += c.n_tokens
    return ids, used


class _ReplayBase(Params):
    """Shared ``ratio``/``select``/``budget`` so every policy has the same budget semantics."""

    ratio: Ratio = Field(DEFAULT_RATIO, description=RATIO_HELP)

    def budget(self, new_tokens: int) -> int:
        return int(self.ratio * max(0, new_tokens))

    def order(
        self, candidates: list[ReplayCandidate], rng: random.Random
    ) -> tuple[list[ReplayCandidate], list[str]]:
        raise NotImplementedError

    def plan(
        self, candidates: list[ReplayCandidate], budget_tokens: int, rng: random.Random
    ) -> Pick:
        name = type(self).policy_name
        if budget_tokens <= 0 or not candidates:
            why = "replay budget is 0" if budget_tokens <= 0 else "replay buffer is empty"
            return Pick([], 0, [f"{name} replay: {why}"])
        ordered, notes = self.order(list(candidates), rng)
        ids, used = fill(ordered, budget_tokens)
        head = (
            f"{name} replay: {len(ids)} of {len(candidates)} buffered chunks,"
            f" {fmt_int(used)} of {fmt_int(budget_tokens)} budget tokens (ratio {self.ratio:g})"
        )
        return Pick(ids, used, [head, *notes])

    def select(
        self, candidates: list[ReplayCandidate], budget_tokens: int, rng: random.Random
    ) -> list[int]:
        return self.plan(candidates, budget_tokens, rng).chunk_ids


@register("replay", "uniform", default=True)
class Uniform(_ReplayBase):
    """Every buffered chunk equally likely (the reservoir is already a uniform sample)."""

    def order(
        self, candidates: list[ReplayCandidate], rng: random.Random
    ) -> tuple[list[ReplayCandidate], list[str]]:
        rng.shuffle(candidates)
        return candidates, []


@register("replay", "recency")
class Recency(_ReplayBase):
    """Recent stages weighted more: weight halves every ``half_life`` stages of age.

    Weighted sampling without replacement (Efraimidis–Spirakis keys ``u ** (1/w)``), so
    old stages still appear, just less often.
    """

    half_life: PositiveFloat = Field(2.0, description="Stages of age that halve the weight.")

    def order(
        self, candidates: list[ReplayCandidate], rng: random.Random
    ) -> tuple[list[ReplayCandidate], list[str]]:
        stages = [c.stage_id for c in candidates if c.stage_id is not None]
        newest = max(stages, default=0)
        keyed = []
        for c in candidates:
            age = newest - c.stage_id if c.stage_id is not None else newest
            weight = 0.5 ** (age / self.half_life)
            u = max(rng.random(), 1e-300)
            keyed.append((math.log(u) / weight, c))  # log of u**(1/w): larger = earlier
        keyed.sort(key=lambda kc: kc[0], reverse=True)
        return [c for _, c in keyed], [
            f"weights halve every {self.half_life:g} stages of age (newest stage {newest})"
        ]


@register("replay", "most_forgotten")
class MostForgotten(_ReplayBase):
    """Chunks whose loss under the current adapter rose the most since they were learned.

    forgetting = current loss (``chunk_scores`` under the current adapter) − learned loss
    (``chunks.learned_loss``, set at promotion). Chunks without both numbers get a cheap
    estimate (``unscored = "estimate"``, default): the mean forgetting of scored chunks
    learned in the same stage, else of all scored chunks. Without the estimate a scorer
    that only rescored the last stage's replay picks would make the policy replay those
    same chunks forever. ``unscored = "last"`` puts them after all scored chunks instead.
    ``explore`` draws that share of picks uniformly, so a stale score cannot starve the rest.
    """

    explore: Fraction = Field(0.0, description="Share of picks drawn uniformly instead.")
    unscored: Literal["estimate", "last"] = Field(
        "estimate", description="Rank unscored chunks by an estimate, or last."
    )

    def order(
        self, candidates: list[ReplayCandidate], rng: random.Random
    ) -> tuple[list[ReplayCandidate], list[str]]:
        rise: dict[int, float] = {
            c.chunk_id: c.current_loss - c.learned_loss
            for c in candidates
            if c.current_loss is not None and c.learned_loss is not None
        }
        unscored = [c for c in candidates if c.chunk_id not in rise]
        rng.shuffle(unscored)
        notes: list[str] = []
        if not rise:
            notes.append("no replay chunk scored under the current adapter yet: uniform order")
            ordered = unscored
        else:
            notes.append(
                f"{len(rise)} of {len(candidates)} candidates scored; largest loss rise"
                f" {max(rise.values()):+.3f}"
            )
            key = self._estimates(candidates, rise)
            if unscored and self.unscored == "estimate":
                notes.append(
                    f"{len(unscored)} unscored candidates ranked by the mean rise of their"
                    " stage (estimate)"
                )
                ordered = sorted(
                    candidates,
                    key=lambda c: (key[c.chunk_id], c.chunk_id in rise),
                    reverse=True,
                )
            else:
                scored = sorted(
                    (c for c in candidates if c.chunk_id in rise),
                    key=lambda c: rise[c.chunk_id],
                    reverse=True,
                )
                if unscored:
                    notes.append(f"{len(unscored)} unscored candidates come after the scored ones")
                ordered = scored + unscored
        if self.explore > 0 and ordered:
            ordered = _interleave(ordered, self.explore, rng)
            notes.append(f"{self.explore:.0%} of picks drawn uniformly (explore)")
        return ordered, notes

    @staticmethod
    def _estimates(candidates: list[ReplayCandidate], rise: dict[int, float]) -> dict[int, float]:
        """Measured rise, or the mean rise of the chunk's stage (else of all scored)."""
        by_stage: dict[int | None, list[float]] = defaultdict(list)
        for c in candidates:
            if c.chunk_id in rise:
                by_stage[c.stage_id].append(rise[c.chunk_id])
        overall = sum(rise.values()) / len(rise)
        out: dict[int, float] = {}
        for c in candidates:
            if c.chunk_id in rise:
                out[c.chunk_id] = rise[c.chunk_id]
            else:
                same = by_stage.get(c.stage_id)
                out[c.chunk_id] = sum(same) / len(same) if same else overall
        return out


def _interleave(
    ordered: list[ReplayCandidate], explore: float, rng: random.Random
) -> list[ReplayCandidate]:
    """Each next pick is uniform with probability ``explore``, else the next in order."""
    rest = list(ordered)
    out: list[ReplayCandidate] = []
    while rest:
        idx = rng.randrange(len(rest)) if rng.random() < explore else 0
        out.append(rest.pop(idx))
    return out


@register("replay", "balanced")
class Balanced(_ReplayBase):
    """Equal token share per source: each next chunk comes from the group (document,
    stage or track) that has the fewest replay tokens so far, so one huge document cannot
    crowd out the rest."""

    by: Literal["source", "stage"] = Field(
        "source", description="Group by source document or by stage."
    )

    def order(
        self, candidates: list[ReplayCandidate], rng: random.Random
    ) -> tuple[list[ReplayCandidate], list[str]]:
        groups: dict[str, list[ReplayCandidate]] = defaultdict(list)
        for c in candidates:
            key = c.source if self.by == "source" else str(c.stage_id)
            groups[key].append(c)
        for items in groups.values():
            rng.shuffle(items)
        used = dict.fromkeys(groups, 0)
        keys = sorted(groups)
        rng.shuffle(keys)
        out: list[ReplayCandidate] = []
        while keys:
            key = min(keys, key=lambda k: used[k])
            item = groups[key].pop()
            out.append(item)
            used[key] += item.n_tokens
            if not groups[key]:
                keys.remove(key)
        return out, [f"equal token share over {len(used)} {self.by} groups"]
