"""Policy parameters are pydantic models; pydantic errors become one ``key.path: problem``.

A policy's parameters, their defaults, ranges and help texts live in one place: its
:class:`Params` subclass (``extra="forbid"``, so a misspelt parameter is an error, and
``validate_default=True``, so a default such as ``"2h"`` goes through the same checker
as a configured value). The same model validates a TOML table and a direct Python call.

:func:`explain` is the one translation of a pydantic ``ValidationError`` into a key path
and a short problem. The config loader (``daemon.config``) uses it too, so a bad
``training.max_steps`` and a bad ``policy.trigger.all[1].any[0].n`` read alike. This
module may not import ``daemon`` (layers), so it raises :class:`ParamError`, a
``ValueError`` that carries the path; the loader re-raises it as ``ConfigError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from store.errors import EvergreenError


class ParamError(EvergreenError, ValueError):
    """A bad parameter; ``path`` is relative to where the table was read (may be '')."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = " ".join(problem.splitlines())  # one line, whatever a checker said
        shown = path if path.isprintable() else repr(path)[1:-1]  # a key may hold "\n"
        super().__init__(f"{shown or '<root>'}: {self.problem}")


class Params(BaseModel):
    """Base of every policy's parameters: strict keys, validated defaults, help texts.

    ``policy_name`` is set by ``@register`` (reasons and stage plans name the policy).
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)
    policy_name: ClassVar[str] = ""


def join_path(*parts: str | int) -> str:
    """('policy', 'trigger', 'all', 1, 'n') -> 'policy.trigger.all[1].n'; '' parts vanish."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out = f"{out}.{part}" if out else part
    return out


_TYPE_NAMES = {
    "int_type": "int",
    "int_from_float": "int",
    "float_type": "float",
    "bool_type": "bool",
    "string_type": "str",
    "list_type": "list",
}
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def explain(exc: ValidationError, model: type[BaseModel] | None = None) -> tuple[str, str]:
    """(key path, problem) of the first error, phrased for a person editing a TOML file."""
    err = exc.errors()[0]
    loc: Sequence[str | int] = err["loc"]
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, ParamError):
        return join_path(*loc, inner.path), inner.problem
    return join_path(*loc), _problem(err["type"], err.get("input"), ctx, model, loc)


def _problem(
    kind: str, value: Any, ctx: dict[str, Any], model: type[BaseModel] | None, loc: Sequence[Any]
) -> str:
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a table, got {type(value).__name__} {value!r}"
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return f"must be {op} {ctx[key]}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}; got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        known = ", ".join(sorted(owner.model_fields)) if owner else "?"
        return f"unknown key (known keys: {known})"
    if kind in ("value_error", "assertion_error") and ctx.get("error") is not None:
        return str(ctx["error"])
    return str(ctx.get("error") or kind)


def _model_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> type[BaseModel] | None:
    """The nested model class that ``loc`` points into (for 'known keys' lists)."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model
