"""Helpers shared by the ingest tests: real files, a real store, small real PDFs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon import config as config_mod
from daemon.config import Config
from store.db import open_db


def make_cfg(state_dir: Path, **ingest: Any) -> Config:
    data: dict[str, Any] = {"state_dir": str(state_dir), "ingest": {"quiet_period_s": 0.3}}
    data["ingest"].update(ingest)
    return config_mod.from_dict(data)


def rows(cfg: Config, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Run one query on a fresh connection (closed again) and return dict rows."""
    db = open_db(cfg.db_path)
    try:
        return [dict(r) for r in db.query(sql, args)]
    finally:
        db.conn.close()


def docs(cfg: Config) -> list[dict[str, Any]]:
    return rows(cfg, "SELECT * FROM documents ORDER BY id")


def chunks(cfg: Config, doc_id: int | None = None) -> list[dict[str, Any]]:
    if doc_id is None:
        return rows(cfg, "SELECT * FROM chunks ORDER BY id")
    return rows(cfg, "SELECT * FROM chunks WHERE document_id = ? ORDER BY seq", (doc_id,))


def events_of(cfg: Config, kind: str) -> list[dict[str, Any]]:
    return rows(cfg, "SELECT * FROM events WHERE kind = ? ORDER BY id", (kind,))


def text_of(cfg: Config, doc_id: int) -> str:
    return "\n".join(c["text"] for c in chunks(cfg, doc_id))


def make_pdf(text: str) -> bytes:
    """A real one-page PDF with ``text`` in Helvetica (hand-written objects and xref)."""
    content = b"BT /F1 12 Tf 72 720 Td (" + text.encode("latin-1") + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return out


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


LOREM = (
    "Evergreen keeps a language model fresh. Documents dropped into the inbox are parsed, "
    "cleaned, deduplicated and cut into chunks that a LoRA stage learns from. "
)
