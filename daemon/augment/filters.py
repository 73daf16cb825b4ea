"""The quality filters synthetic text passes before it is stored: the ingest ones.

A method (above all a small model) can write empty, repeated or broken text; it must
not reach training unchecked. Each text gets the normalisation and PII scrub user
documents get (:mod:`daemon.textfilter`), the same garbage threshold
(``ingest.max_garbage_ratio``), and a minimum length (``augment.min_chars``).
"""

from __future__ import annotations

from daemon.config import Config
from daemon.textfilter import garbage_ratio, normalise, scrub_pii
from policies.augment import Variant
from store.synthetic import SyntheticIn

EMPTY, TOO_SHORT, GARBAGE, SAME = "empty", "too_short", "garbage", "same_as_source"


def estimate_tokens(text: str, source_text: str, source_tokens: int) -> int:
    """Tokens of ``text`` at the source chunk's characters-per-token rate.

    The daemon does not load the tokenizer (the stage re-tokenises everything it trains
    on); this count only sizes budgets, and rewrites of one chunk share its language.
    """
    per_char = source_tokens / max(1, len(source_text))
    return max(1, round(len(text) * per_char))


def clean(
    cfg: Config, variant: Variant, source_text: str, source_tokens: int
) -> tuple[SyntheticIn | None, str]:
    """``(item, "")`` for a text that passes, ``(None, reason)`` for one that does not."""
    text = normalise(variant.text)
    if text and cfg.ingest.pii_scrub:
        text = scrub_pii(text)
    if not text:
        return None, EMPTY
    if text == normalise(source_text):
        return None, SAME
    if garbage_ratio(text) > cfg.ingest.max_garbage_ratio:
        return None, GARBAGE
    if len(text) < cfg.augment.min_chars:
        return None, TOO_SHORT
    return SyntheticIn(text, estimate_tokens(text, source_text, source_tokens), variant.label), ""
