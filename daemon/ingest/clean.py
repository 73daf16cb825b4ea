"""The quality filters of a parsed document, over the shared normalisation and PII scrub.

The pure text measures (:func:`normalise`, :func:`garbage_ratio`, :func:`scrub_pii`) live
in :mod:`daemon.textfilter`, which augmentation uses too; they are re-exported here.
"""

from __future__ import annotations

from daemon.ingest.parsers import EMPTY, GARBAGE, TOO_SHORT, Quarantine, Segment
from daemon.textfilter import (  # the pure measures live below ingest and augment
    EMAIL_PLACEHOLDER,
    PHONE_PLACEHOLDER,
    garbage_ratio,
    normalise,
    scrub_pii,
)

__all__ = [
    "EMAIL_PLACEHOLDER",
    "PHONE_PLACEHOLDER",
    "clean_segments",
    "garbage_ratio",
    "normalise",
    "scrub_pii",
]


def clean_segments(
    segments: list[Segment], *, min_chars: int, max_garbage_ratio: float, pii_scrub: bool
) -> list[Segment]:
    """Normalise every segment, then apply the quality filters to the document as a whole."""
    out: list[Segment] = []
    for seg in segments:
        if seg.kind == "chat":
            msgs = [
                {"role": m["role"], "content": _clean_one(m["content"], pii_scrub)}
                for m in seg.messages
            ]
            out.append(Segment("chat", messages=msgs))
        else:
            text = _clean_one(seg.text, pii_scrub)
            if text:
                out.append(Segment("text", text))
    parts = [s.text for s in out if s.kind == "text"]
    parts += [m["content"] for s in out if s.kind == "chat" for m in s.messages]
    total = sum(len(p) for p in parts)
    if total == 0:
        raise Quarantine(EMPTY, "no text after normalisation")
    bad = sum(garbage_ratio(p) * len(p) for p in parts) / total
    if bad > max_garbage_ratio:
        raise Quarantine(GARBAGE, f"{bad:.0%} control/replacement characters")
    if total < min_chars:
        raise Quarantine(TOO_SHORT, f"{total} characters (min_chars = {min_chars})")
    return out


def _clean_one(text: str, pii_scrub: bool) -> str:
    text = normalise(text)
    return scrub_pii(text) if pii_scrub and text else text
