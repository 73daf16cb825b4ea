"""The trigger tree: ``{name=..., params}`` leaves combined by ``all=[...]``/``any=[...]``.

Each leaf explains itself twice (see :mod:`policies.triggers`); the combinators fold the
children's texts into one line (``next stage when ≥ 20,000 new tokens (now 12,400) or at
02:00 (staleness 6h), cooldown ends 14:05``) and their ``due_at`` into an estimate of the
next stage. :data:`DEFAULT_TREE` is the tree a config without ``[policy.trigger]`` gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from policies.base import Decision, TriggerPolicy, TriggerState, build, with_defaults
from policies.params import ParamError, join_path

# Train at most every 5 minutes, once 2,000 new tokens wait or the oldest is an hour old.
DEFAULT_TREE: dict[str, Any] = {
    "all": [
        {"name": "cooldown", "duration": "5m"},
        {
            "any": [
                {"name": "min_new_tokens", "n": 2000},
                {"name": "max_staleness", "duration": "1h"},
            ]
        },
    ]
}


def leaf(
    name: str, fire: bool, reason: str, when: str, *, due_at: float | None = None, order: int = 0
) -> Decision:
    """One leaf's decision: its reason, its "next stage when" phrase, and ``due_at``."""
    data: dict[str, Any] = {
        "policy": name,
        "when": when,
        "leaves": [{"policy": name, "fire": fire, "reason": reason}],
        "order": order,
    }
    if due_at is not None:
        data["due_at"] = due_at
    return Decision(fire=fire, reasons=[reason], data=data)


# ----------------------------------------------------------------------------- combinators
def _children_leaves(children: list[Decision]) -> list[dict[str, Any]]:
    return [leaf for d in children for leaf in d.data.get("leaves", [])]


def _wait_text(d: Decision, *, inside: str) -> str:
    when = str(d.data.get("summary") or d.data.get("when") or "; ".join(d.reasons))
    # "," (all) binds looser than "or" (any), so only an all-group inside an any needs ().
    if inside == "any" and d.data.get("combinator") == "all" and d.data.get("n_parts", 1) > 1:
        return f"({when})"
    return when


def _fire_text(d: Decision) -> str:
    return str(d.data.get("summary") or "; ".join(d.reasons))


@dataclass
class AllOf:
    """Fires when every child fires. Waiting text lists the unmet children."""

    children: list[TriggerPolicy]

    def evaluate(self, state: TriggerState) -> Decision:
        results = [c.evaluate(state) for c in self.children]
        fire = all(d.fire for d in results)
        reasons = [r for d in results for r in d.reasons]
        if fire:
            parts = [_fire_text(d) for d in results]
            due = None
        else:
            unmet = sorted((d for d in results if not d.fire), key=lambda d: d.data.get("order", 0))
            parts = [_wait_text(d, inside="all") for d in unmet]
            dues = [d.data.get("due_at") for d in unmet]
            due = max(dues) if dues and all(x is not None for x in dues) else None  # type: ignore[type-var]
        data: dict[str, Any] = {
            "combinator": "all",
            "summary": ("; " if fire else ", ").join(p for p in parts if p),
            "n_parts": len([p for p in parts if p]),
            "leaves": _children_leaves(results),
            "children": [d.data | {"fire": d.fire, "reasons": d.reasons} for d in results],
        }
        if due is not None:
            data["due_at"] = due
        return Decision(fire=fire, reasons=reasons, data=data)


@dataclass
class AnyOf:
    """Fires when at least one child fires. Waiting text joins the children with "or"."""

    children: list[TriggerPolicy]

    def evaluate(self, state: TriggerState) -> Decision:
        results = [c.evaluate(state) for c in self.children]
        fire = any(d.fire for d in results)
        if fire:
            firing = [d for d in results if d.fire]
            parts = [_fire_text(d) for d in firing]
            reasons = [r for d in firing for r in d.reasons]
            due = None
        else:
            parts = [_wait_text(d, inside="any") for d in results]
            reasons = [r for d in results for r in d.reasons]
            dues = [d.data["due_at"] for d in results if d.data.get("due_at") is not None]
            due = min(dues) if dues else None
        data: dict[str, Any] = {
            "combinator": "any",
            "summary": ("; " if fire else " or ").join(p for p in parts if p),
            "n_parts": len([p for p in parts if p]),
            "leaves": _children_leaves(results),
            "children": [d.data | {"fire": d.fire, "reasons": d.reasons} for d in results],
        }
        if due is not None:
            data["due_at"] = due
        return Decision(fire=fire, reasons=reasons, data=data)


def _combinator(tree: Any, path: str) -> str | None:
    """'all'/'any' for a combinator node, None for a leaf; rejects malformed nodes."""
    if not isinstance(tree, dict):
        raise ParamError(
            path, f"must be a table ({{name = ...}}, all = [...] or any = [...]), got {tree!r}"
        )
    combos = [k for k in ("all", "any") if k in tree]
    if not combos:
        return None
    if len(tree) != 1:
        extra = ", ".join(sorted(k for k in tree if k != combos[0]))
        raise ParamError(
            path,
            f"a node is either {{name = ...}}, all = [...] or any = [...]; also got {extra}",
        )
    key = combos[0]
    if not isinstance(tree[key], list) or not tree[key]:
        raise ParamError(join_path(path, key), "must be a non-empty list of trigger nodes")
    return key


def build_trigger(tree: Any, path: str = "policy.trigger") -> TriggerPolicy:
    """Build a trigger tree: ``{name=..., params}`` leaves, ``{all=[...]}``/``{any=[...]}``.

    Every problem raises :class:`~policies.params.ParamError` naming the exact node, e.g.
    ``policy.trigger.all[1].any[0].n: must be a positive integer, got -3``.
    """
    key = _combinator(tree, path)
    if key is None:
        policy: TriggerPolicy = build("trigger", tree, path)
        return policy
    children = [build_trigger(c, join_path(path, key, i)) for i, c in enumerate(tree[key])]
    return AllOf(children) if key == "all" else AnyOf(children)


def normalize_tree(tree: Any, path: str = "") -> dict[str, Any]:
    """The validated tree with every leaf's defaults filled in (what the config stores)."""
    key = _combinator(tree, path)
    if key is None:
        return with_defaults("trigger", tree, path)
    return {key: [normalize_tree(c, join_path(path, key, i)) for i, c in enumerate(tree[key])]}


def uses(tree: Any, name: str) -> bool:
    """Whether the (already validated) tree has a leaf called ``name``."""
    if isinstance(tree, dict):
        if tree.get("name") == name:
            return True
        return any(uses(c, name) for k in ("all", "any") for c in tree.get(k, []) or [])
    return False
