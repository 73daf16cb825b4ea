"""Bytes -> text segments, chosen by file suffix.

A parser either returns :class:`Parsed` or raises :class:`Quarantine` with a short reason
class (``undecodable``, ``malformed_jsonl``, ``broken_pdf``, ...). Anything else a parser
library throws is turned into a ``Quarantine`` by :func:`parse`, so one bad file can never
take the daemon down.

JSONL rule: a file is all-or-nothing. Blank lines are skipped; any other line that is not a
JSON object of a known shape quarantines the whole file, and the reason names the first bad
line number. Half-ingesting a file would make "this file was learned" ambiguous, and the
user gets one precise place to fix.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

TEXT_SUFFIXES = {".txt": "txt", ".md": "md", ".markdown": "md"}
HTML_SUFFIXES = {".html": "html", ".htm": "html"}
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, *HTML_SUFFIXES, ".pdf", ".jsonl")
CHAT_ROLES = ("system", "user", "assistant")

# Reason classes (the token before ':' in a quarantined document's error).
TOO_LARGE = "too_large"
UNDECODABLE = "undecodable"
MALFORMED_JSONL = "malformed_jsonl"
BROKEN_PDF = "broken_pdf"
EMPTY = "empty"
TOO_SHORT = "too_short"
GARBAGE = "garbage"
OUTSIDE_INBOX = "outside_inbox"
UNREADABLE = "unreadable"
UNSUPPORTED = "unsupported"
REASONS = (
    TOO_LARGE,
    UNDECODABLE,
    MALFORMED_JSONL,
    BROKEN_PDF,
    EMPTY,
    TOO_SHORT,
    GARBAGE,
    OUTSIDE_INBOX,
    UNREADABLE,
    UNSUPPORTED,
)


class Quarantine(Exception):
    """A file that must not be ingested; ``str()`` is ``"<reason>: <detail>"``."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class Segment:
    """One unit of content: free text (chunked later) or one chat example (one chunk)."""

    kind: str  # text | chat
    text: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Parsed:
    fmt: str
    segments: list[Segment]


def format_of(suffix: str) -> str | None:
    """The document format for a suffix, or None when unsupported."""
    suffix = suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return TEXT_SUFFIXES[suffix]
    if suffix in HTML_SUFFIXES:
        return HTML_SUFFIXES[suffix]
    if suffix in (".pdf", ".jsonl"):
        return suffix[1:]
    return None


def parse(data: bytes, suffix: str) -> Parsed:
    """Parse ``data`` as the format its suffix names. Raises only :class:`Quarantine`."""
    fmt = format_of(suffix)
    if fmt is None:
        supported = " ".join(SUPPORTED_SUFFIXES)
        raise Quarantine(UNSUPPORTED, f"suffix {suffix or '(none)'!r} (supported: {supported})")
    if not data:
        raise Quarantine(EMPTY, "file is empty")
    try:
        if fmt in ("txt", "md"):
            return Parsed(fmt, [Segment("text", decode_text(data))])
        if fmt == "html":
            return Parsed(fmt, [Segment("text", html_to_text(data))])
        if fmt == "pdf":
            return Parsed(fmt, [Segment("text", pdf_to_text(data))])
        return Parsed(fmt, parse_jsonl(data))
    except Quarantine:
        raise
    except RecursionError:
        raise Quarantine(GARBAGE, "structure nested too deeply") from None
    except Exception as exc:  # a parser library bug or an input it chokes on
        if "Document is empty" in str(exc):  # lxml: markup with no elements at all
            raise Quarantine(EMPTY, "no content") from None
        reason = BROKEN_PDF if fmt == "pdf" else UNDECODABLE
        raise Quarantine(reason, f"{type(exc).__name__}: {exc}"[:300]) from None


_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_text(data: bytes, fallback: str | None = None) -> str:
    """Strict UTF-8; UTF-16/32 only with a BOM; ``fallback`` (a declared charset) last.

    No permissive fallback such as latin-1: it decodes *any* bytes, so binary junk would
    sail through as "text". Undecodable input is quarantined instead.
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                raise Quarantine(UNDECODABLE, f"invalid {codec} at byte {exc.start}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        first_error = exc
    if fallback:
        try:
            return data.decode(fallback)
        except (UnicodeDecodeError, LookupError):
            pass
    raise Quarantine(
        UNDECODABLE,
        f"not valid UTF-8 (byte 0x{data[first_error.start]:02x} at {first_error.start})",
    )


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


def html_to_text(data: bytes) -> str:
    """HTML -> readable text with inscriptis (keeps list and table layout), at any depth."""
    from daemon.ingest import htmltext

    m = _META_CHARSET.search(data[:4096])
    declared = m.group(1).decode("ascii", "replace") if m else None
    if declared and declared.lower().replace("_", "-") in ("utf-8", "utf8"):
        declared = None
    html = decode_text(data, fallback=declared)
    if not html.strip():
        raise Quarantine(EMPTY, "HTML has no content")
    return htmltext.to_text(html)


def pdf_to_text(data: bytes) -> str:
    """Text of every page (pypdf, non-strict). Encrypted or unreadable -> broken_pdf."""
    import logging

    from pypdf import PdfReader

    # pypdf logs recoverable damage at WARNING on every page; the quarantine reason is enough.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise Quarantine(BROKEN_PDF, "no %PDF header")
    reader = PdfReader(io.BytesIO(data), strict=False)
    if reader.is_encrypted:
        try:
            ok = bool(reader.decrypt(""))
        except Exception:
            ok = False
        if not ok:
            raise Quarantine(BROKEN_PDF, "encrypted")
    pages = [page.extract_text() or "" for page in reader.pages]
    text = "\n\n".join(p for p in pages if p.strip())
    if not text.strip():
        raise Quarantine(EMPTY, f"no extractable text in {len(pages)} page(s) (scanned PDF?)")
    return text


def parse_jsonl(data: bytes) -> list[Segment]:
    """One segment per record: ``{"text"}``, ``{"messages"}`` or ``{"prompt","completion"}``."""
    text = decode_text(data)
    segments: list[Segment] = []
    # JSON Lines are separated by "\n" only: str.splitlines() would also split on form
    # feeds, U+2028 and other characters that may sit inside a record's text, and number
    # the lines differently from every editor.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise Quarantine(MALFORMED_JSONL, f"line {lineno}: invalid JSON ({msg})") from None
        segment = _record(record, lineno)
        if segment is not None:
            segments.append(segment)
    if not segments:
        raise Quarantine(EMPTY, "no non-empty records")
    return segments


def _record(record: Any, lineno: int) -> Segment | None:
    def bad(why: str) -> Quarantine:
        return Quarantine(MALFORMED_JSONL, f"line {lineno}: {why}")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return Segment("chat", messages=_messages(record["messages"], bad))
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise bad("'prompt' and 'completion' must both be strings")
        if not completion.strip():
            raise bad("'completion' is empty")
        return Segment(
            "chat",
            messages=[
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ],
        )
    if "text" in record:
        if not isinstance(record["text"], str):
            raise bad("'text' must be a string")
        return Segment("text", record["text"]) if record["text"].strip() else None
    raise bad("no 'text', 'messages' or 'prompt'/'completion' key")


def _messages(raw: Any, bad: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise bad(f"message {i} is not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in CHAT_ROLES:
            raise bad(f"message {i} has role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str):
            raise bad(f"message {i} content must be a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise bad("no non-empty assistant message to learn from")
    return out
