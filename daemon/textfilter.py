"""Text normalisation and the quality measures shared by every writer of training text.

Moved here from ``daemon.ingest.clean`` so that ingest and augmentation (two workers that
may not import each other, see the layers contract in pyproject) apply the very same
normalisation, garbage measure and PII scrub: synthetic study text must pass the filters
user documents pass. Pure functions; no store, no I/O.

Normalisation is deliberately conservative because documents may be code or Markdown:
Unicode NFC, one newline convention, exotic spaces become plain spaces, trailing spaces go,
runs of blank lines shrink to one, but indentation is kept.
"""

from __future__ import annotations

import re
import unicodedata

_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x85]")
# Unicode space separators other than the plain space (NBSP, thin space, ideographic, ...).
_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_ZERO_WIDTH = re.compile(r"[\u200b\u2060\ufeff]")
# Characters that signal binary junk: C0/C1 controls except tab/newline, U+FFFD, and
# anything in the surrogate range (cannot occur in valid text).
_GARBAGE_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff]")


def normalise(text: str) -> str:
    """NFC + whitespace normalisation (indentation preserved)."""
    if not text.isascii():
        # Lone surrogates (from JSON "\ud800" escapes) cannot be stored as UTF-8.
        text = _SURROGATES.sub("\ufffd", text)
        text = unicodedata.normalize("NFC", text)
        text = _ODD_SPACES.sub(" ", text)
        text = _ZERO_WIDTH.sub("", text)
        text = _NEWLINES.sub("\n", text)
    elif "\r" in text or "\x0b" in text or "\x0c" in text:  # `in` is far cheaper than a regex
        text = _NEWLINES.sub("\n", text)
    if "\t\n" in text or " \n" in text:
        text = _TRAILING.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def garbage_ratio(text: str) -> float:
    """Share of characters that look like binary junk rather than text."""
    if not text:
        return 0.0
    bad = len(_GARBAGE_CHARS.findall(text))
    if text.isascii():
        return bad / len(text)
    # Private-use and unassigned code points are junk too (a wrong decode produces them).
    bad += sum(1 for ch in text if ord(ch) > 0x7F and unicodedata.category(ch) in ("Co", "Cn"))
    return bad / len(text)


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w.-]?\d)"
)
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
EMAIL_PLACEHOLDER = "[EMAIL]"
PHONE_PLACEHOLDER = "[PHONE]"


def _phone(match: re.Match[str]) -> str:
    """Best effort: 7-15 digits with a separator, '+' or '(...)'; not a date or an IP."""
    s = match.group(0)
    digits = sum(c.isdigit() for c in s)
    if not 7 <= digits <= 15:
        return s
    has_marker = s.startswith("+") or "(" in s
    has_sep = any(c in " .-" for c in s)
    if not (has_marker or has_sep) or _DATE.match(s) or _IPV4.match(s):
        return s
    return PHONE_PLACEHOLDER


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses and phone numbers with placeholders."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_PLACEHOLDER, text)
    return _PHONE.sub(_phone, text)
