"""Parameter checkers ("5m" -> 300.0) and the formatters used in decision reasons.

Checkers take the raw TOML value and return the converted one, or raise ``ValueError``
with a message that reads well after a key path: ``policy.trigger.n: must be a positive
integer, got -3``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, tzinfo
from typing import Annotated, Any

from pydantic import BeforeValidator

# Bounds keep every later datetime computation (now ± duration) in range.
MAX_DURATION_S = 10 * 365 * 86400.0
MAX_BYTES = 1024**6  # 1 EiB
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"6h"``, ``"1d"``, ``"1h30m"`` or a number of seconds."""
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_RE.findall(text)
            if not parts or _DURATION_RE.sub("", text).strip():
                raise ValueError(
                    f"must be a duration like '30s', '5m', '6h' or '1d', got {value!r}"
                )
            seconds = sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in parts)
    else:
        raise ValueError(f"must be a duration like '30s', '5m', '6h' or '1d', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must be a non-negative duration, got {value!r}")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"must be at most 10 years, got {value!r}")
    return seconds


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration like '30s', '5m', '6h', got {value!r}")
    return seconds


def parse_bytes(value: Any) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1.5G"`` or a number of bytes."""
    size: float | None = None
    if _is_number(value):
        size = float(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if size is not None and math.isfinite(size) and 0 <= size <= MAX_BYTES:
        return int(size)
    raise ValueError(f"must be a size like '512MiB', '2GiB' or a number of bytes, got {value!r}")


def positive_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"must be a positive integer, got {value!r}")


def nonneg_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"must be a non-negative integer, got {value!r}")


def nonneg_float(value: Any) -> float:
    if _is_number(value) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"must be a non-negative number, got {value!r}")


def positive_float(value: Any) -> float:
    if _is_number(value) and math.isfinite(value) and value > 0:
        return float(value)
    raise ValueError(f"must be a positive number, got {value!r}")


def fraction(value: Any) -> float:
    if _is_number(value) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"must be a number between 0 and 1, got {value!r}")


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {value!r}")


def text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"must be a string, got {value!r}")


# Parameter types for :class:`policies.params.Params` models: the checker above is the
# one place each rule lives, and runs before pydantic's own type check.
PositiveInt = Annotated[int, BeforeValidator(positive_int)]
NonNegInt = Annotated[int, BeforeValidator(nonneg_int)]
PositiveFloat = Annotated[float, BeforeValidator(positive_float)]
NonNegFloat = Annotated[float, BeforeValidator(nonneg_float)]
Fraction = Annotated[float, BeforeValidator(fraction)]
PositiveDuration = Annotated[float, BeforeValidator(positive_duration)]
Bytes = Annotated[int, BeforeValidator(parse_bytes)]
Bool = Annotated[bool, BeforeValidator(boolean)]
Text = Annotated[str, BeforeValidator(text)]


# ----------------------------------------------------------------------------- formatting
def fmt_int(n: float) -> str:
    """20000 -> '20,000'."""
    return f"{round(n):,}"


def fmt_duration(seconds: float) -> str:
    """Short human durations: '45s', '5m', '2h 5m', '1d 3h' (two units at most)."""
    seconds = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (name, size) in enumerate(units):
        if seconds >= size or name == "s":
            value, rest = divmod(seconds, size)
            out = f"{value}{name}"
            if i + 1 < len(units):
                name2, size2 = units[i + 1]
                if rest // size2:
                    out += f" {rest // size2}{name2}"
            return out
    return "0s"  # pragma: no cover - the loop always returns at "s"


def fmt_clock(ts: float, tz: tzinfo, now: float | None = None) -> str:
    """'14:05' on the same day as ``now``, 'tomorrow 02:00', else 'Sat 21 Nov 02:00'."""
    dt = datetime.fromtimestamp(ts, tz)
    if now is not None:
        days = (dt.date() - datetime.fromtimestamp(now, tz).date()).days
        if days == 0:
            return dt.strftime("%H:%M")
        if days == 1:
            return dt.strftime("tomorrow %H:%M")
    return dt.strftime("%a %d %b %H:%M")


def fmt_when(ts: float, tz: tzinfo, now: float) -> str:
    """'at 14:05', 'tomorrow at 02:00' or 'on Sat 21 Nov at 02:00' (reads after a verb)."""
    text = fmt_clock(ts, tz, now)
    if text.startswith("tomorrow "):
        return "tomorrow at " + text.removeprefix("tomorrow ")
    if " " in text:
        day, clock = text.rsplit(" ", 1)
        return f"on {day} at {clock}"
    return f"at {text}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
