"""Replay and selection policies: same budget semantics, policy-specific order, reasons."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from policies.base import ReplayCandidate, ReplayPolicy, build
from policies.replay import fill
from policies.selection import PendingChunk


def cand(cid: int, n: int = 10, **kw: Any) -> ReplayCandidate:
    return ReplayCandidate(chunk_id=cid, n_tokens=n, **kw)


def replay(spec: dict[str, Any]) -> Any:
    return build("replay", spec, "policy.replay")


def test_fill_takes_what_fits_in_order() -> None:
    ordered = [cand(1, 60), cand(2, 50), cand(3, 30), cand(4, 10)]
    assert fill(ordered, 100) == ([1, 3, 4], 100)
    assert fill(ordered, 0) == ([], 0)


@pytest.mark.parametrize("name", ["uniform", "recency", "most_forgotten", "balanced"])
def test_every_replay_policy_respects_the_same_budget(name: str) -> None:
    pool = [
        cand(
            i,
            10 + i % 7,
            stage_id=i % 5,
            source=f"doc{i % 3}",
            learned_loss=1.0,
            current_loss=1.0 + (i % 11) / 10,
        )
        for i in range(200)
    ]
    policy = replay({"name": name, "ratio": 0.5})
    assert isinstance(policy, ReplayPolicy)
    budget = policy.budget(1000)
    assert budget == 500
    ids = policy.select(pool, budget, random.Random(0))
    tokens = {c.chunk_id: c.n_tokens for c in pool}
    used = sum(tokens[i] for i in ids)
    assert 500 - 16 < used <= 500  # filled to within one chunk of the budget
    assert len(set(ids)) == len(ids)
    # deterministic for a given rng seed
    assert ids == policy.select(pool, budget, random.Random(0))


def test_most_forgotten_orders_by_loss_rise() -> None:
    pool = [
        cand(1, learned_loss=2.0, current_loss=2.1),  # +0.1
        cand(2, learned_loss=1.0, current_loss=2.5),  # +1.5  most forgotten
        cand(3, learned_loss=3.0, current_loss=2.0),  # -1.0  improved
        cand(4, learned_loss=1.0, current_loss=1.9),  # +0.9
        cand(5),  # unscored: after the scored ones
    ]
    last = replay({"name": "most_forgotten", "ratio": 1.0, "unscored": "last"})
    pick = last.plan(pool, 30, random.Random(0))
    assert pick.chunk_ids == [2, 4, 1]
    assert "4 of 5 candidates scored; largest loss rise +1.500" in pick.reasons
    assert "1 unscored candidates come after the scored ones" in pick.reasons
    # default: the unscored chunk is ranked by the mean rise (+0.375), ahead of chunk 1 (+0.1)
    pick = replay({"name": "most_forgotten", "ratio": 1.0}).plan(pool, 30, random.Random(0))
    assert pick.chunk_ids == [2, 4, 5]
    assert "1 unscored candidates ranked by the mean rise of their stage (estimate)" in pick.reasons


def test_most_forgotten_estimates_unscored_from_their_stage() -> None:
    """A scorer that rescored only stage 2 must not lock replay onto stage 2 forever."""
    pool = [
        cand(1, stage_id=1, learned_loss=1.0, current_loss=3.0),  # stage 1 forgot +2.0
        cand(2, stage_id=1),  # unscored, estimate +2.0
        cand(3, stage_id=2, learned_loss=1.0, current_loss=1.5),  # +0.5
        cand(4, stage_id=2, learned_loss=1.0, current_loss=1.2),  # +0.2
        cand(5, stage_id=2),  # unscored, estimate +0.35
    ]
    ids = replay({"name": "most_forgotten", "ratio": 1.0}).select(pool, 50, random.Random(0))
    assert ids == [1, 2, 3, 5, 4]


def test_most_forgotten_without_scores_says_so() -> None:
    pick = replay({"name": "most_forgotten"}).plan(
        [cand(i) for i in range(5)], 20, random.Random(0)
    )
    assert len(pick.chunk_ids) == 2
    assert "no replay chunk scored under the current adapter yet: uniform order" in pick.reasons


def test_recency_prefers_recent_stages() -> None:
    pool = [cand(i, stage_id=1 if i < 500 else 9) for i in range(1000)]
    policy = replay({"name": "recency", "ratio": 1.0, "half_life": 1.0})
    ids = policy.select(pool, 100 * 10, random.Random(1))
    recent = sum(1 for i in ids if i >= 500)
    # age 8 stages at half-life 1 -> weight 1/256: nearly everything is from stage 9
    assert recent >= 95


def test_uniform_is_unbiased_across_stages() -> None:
    pool = [cand(i, stage_id=1 if i < 500 else 9) for i in range(1000)]
    ids = replay({"name": "uniform", "ratio": 1.0}).select(pool, 200 * 10, random.Random(1))
    recent = sum(1 for i in ids if i >= 500)
    assert 70 <= recent <= 130


def test_balanced_gives_each_source_an_equal_share() -> None:
    pool = [cand(i, source="big") for i in range(90)] + [
        cand(100 + i, source=f"small{i % 3}") for i in range(9)
    ]
    pick = replay({"name": "balanced", "ratio": 1.0}).plan(pool, 120, random.Random(0))
    by_source = Counter(c.source for c in pool if c.chunk_id in set(pick.chunk_ids))
    assert by_source == {"big": 3, "small0": 3, "small1": 3, "small2": 3}
    assert "equal token share over 4 source groups" in pick.reasons


def test_replay_reasons_for_empty_inputs() -> None:
    policy = replay({"name": "uniform", "ratio": 0.0})
    assert policy.plan([cand(1)], policy.budget(1000), random.Random(0)).reasons == [
        "uniform replay: replay budget is 0"
    ]
    assert replay({"name": "uniform"}).plan([], 100, random.Random(0)).reasons == [
        "uniform replay: replay buffer is empty"
    ]


# --- selection (active learning)
def pending(cid: int, n: int, loss: float | None, created: float = 0.0) -> PendingChunk:
    return PendingChunk(chunk_id=cid, n_tokens=n, created_at=created or float(cid), loss=loss)


SELECTION_CASES: list[tuple[str, dict[str, Any], list[PendingChunk], list[int], str]] = [
    (
        "highest-loss-first",
        {"name": "highest_loss", "token_budget": 250},
        [pending(1, 100, 1.0), pending(2, 100, 3.0), pending(3, 100, 2.0), pending(4, 100, 0.5)],
        [2, 3],
        "highest_loss selection: 2 of 4 pending chunks, 200 tokens (budget 250); 2 chunks wait"
        " for the next stage",
    ),
    (
        "fifo-fallback-unscored",
        {"name": "highest_loss", "token_budget": 200},
        [pending(3, 100, None), pending(1, 100, None), pending(2, 100, None)],
        [1, 2],
        "no pending chunk scored yet: oldest first (FIFO fallback)",
    ),
    (
        "scored-then-unscored-fifo",
        {"name": "highest_loss", "token_budget": 0},
        [pending(1, 10, None), pending(2, 10, 0.1), pending(3, 10, None), pending(4, 10, 5.0)],
        [4, 2, 1, 3],
        "2 unscored chunks follow, oldest first",
    ),
    (
        "oversized-chunk-still-progresses",
        {"name": "highest_loss", "token_budget": 50},
        [pending(1, 500, 2.0), pending(2, 10, 1.0)],
        [1],
        "1 of 2 pending chunks, 500 tokens (budget 50)",
    ),
    (
        "fifo-policy",
        {"name": "fifo", "token_budget": 20},
        [pending(5, 10, 9.0), pending(1, 10, 0.1), pending(3, 10, 1.0)],
        [1, 3],
        "fifo selection: 2 of 3 pending chunks, 20 tokens (budget 20); 1 chunks wait",
    ),
]


@pytest.mark.parametrize(
    ("spec", "chunks", "expected", "reason"),
    [c[1:] for c in SELECTION_CASES],
    ids=[c[0] for c in SELECTION_CASES],
)
def test_selection(
    spec: dict[str, Any], chunks: list[PendingChunk], expected: list[int], reason: str
) -> None:
    pick = build("selection", spec, "policy.selection").plan(chunks, random.Random(0))
    assert pick.chunk_ids == expected
    assert any(reason in r for r in pick.reasons), pick.reasons
