"""Render a config model as commented TOML that ``tomllib`` reads back to the same values.

``evergreen config show`` output is meant to be saved and edited, so it must always be
valid TOML, whatever the strings hold (newlines, quotes, backslashes, control
characters, any unicode): strings are written as basic strings with every character
TOML forbids there escaped, and keys that are not bare keys are quoted.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def render_toml(model: BaseModel) -> str:
    """Top-level keys first, then one ``[section]`` per nested model, help as comments."""
    lines: list[str] = []
    _render(model, "", lines)
    return "\n".join(lines).strip() + "\n"


def _render(model: BaseModel, prefix: str, lines: list[str]) -> None:
    sections: list[tuple[str, BaseModel]] = []
    for name, f in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sections.append((name, value))
            continue
        lines.extend(f"# {line}" for line in (f.description or "").splitlines())
        lines.append(f"{toml_key(name)} = {toml_value(value)}")
    for name, value in sections:
        path = f"{prefix}.{toml_key(name)}" if prefix else toml_key(name)
        lines.append("")
        lines.append(f"[{path}]")
        _render(value, path, lines)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def toml_string(text: str) -> str:
    """A TOML basic string: escapes, and \\uXXXX for the other control characters."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot render {value!r} as TOML")
