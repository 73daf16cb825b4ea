"""Exactly-once ingestion on real files and a real SQLite store on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.ingest.pipeline import Ingester, ingest_paths
from store.db import open_db
from tests.ingest_helpers import (
    LOREM,
    chunks,
    docs,
    events_of,
    jsonl,
    make_cfg,
    make_pdf,
    rows,
    text_of,
)


@pytest.fixture
def inbox(cfg: Config) -> Path:
    path = Path(cfg.inbox_dir)
    path.mkdir(parents=True)
    return path


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def bump_mtime(path: Path) -> None:
    """Rewrites within one timestamp tick look unchanged to a stat; make the change visible."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# ----------------------------------------------------------------------------- formats
def test_every_format_is_ingested_with_its_content(cfg: Config, inbox: Path) -> None:
    write(inbox / "a.txt", "Plain text about gardening and evergreen trees.\n")
    write(inbox / "b.md", "# Heading\n\nMarkdown body about pruning conifers in winter.\n")
    write(
        inbox / "c.html",
        "<html><head><title>t</title><script>var x = 1;</script></head><body>"
        "<h1>Hemlock</h1><p>The hemlock is a <b>shade tolerant</b> tree.</p></body></html>",
    )
    write(inbox / "d.pdf", make_pdf("Spruce needles are square in cross section"))
    write(inbox / "e.jsonl", jsonl({"text": "A record of text about fir cones and seeds."}))
    write(
        inbox / "f.jsonl",
        jsonl(
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                ]
            },
            {"prompt": "Capital of France?", "completion": "Paris."},
        ),
    )
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 6, summary
    assert summary["errors"] == []
    by_name = {Path(d["path"]).name: d for d in docs(cfg)}
    assert {d["format"] for d in by_name.values()} == {"txt", "md", "html", "pdf", "jsonl"}
    assert all(d["status"] == "ingested" for d in by_name.values())

    html = text_of(cfg, by_name["c.html"]["id"])
    assert "Hemlock" in html and "shade tolerant" in html
    assert "<b>" not in html and "var x" not in html
    assert "square in cross section" in text_of(cfg, by_name["d.pdf"]["id"])
    assert "# Heading" in text_of(cfg, by_name["b.md"]["id"])

    chat = chunks(cfg, by_name["f.jsonl"]["id"])
    assert [c["kind"] for c in chat] == ["chat", "chat"]
    assert json.loads(chat[0]["text"]) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert json.loads(chat[1]["text"]) == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert {c["kind"] for c in chunks(cfg, by_name["e.jsonl"]["id"])} == {"text"}
    assert all(c["status"] == "pending" and c["n_tokens"] > 0 for c in chunks(cfg))


def test_utf16_with_bom_and_nfc_normalisation(cfg: Config, inbox: Path) -> None:
    write(
        inbox / "u16.txt",
        ("Cafe\u0301 au lait, cre\u0300me bru\u0302le\u0301e.  \r\n" * 3).encode("utf-16"),
    )
    ingest_paths(cfg, [inbox])
    (doc,) = docs(cfg)
    text = text_of(cfg, doc["id"])
    assert "Café au lait" in text  # NFC: e + combining acute -> é
    assert "\r" not in text and " \n" not in text


# ----------------------------------------------------------------------------- exactly once
def test_same_content_under_two_names_is_stored_once(cfg: Config, inbox: Path) -> None:
    write(inbox / "a.txt", LOREM)
    write(inbox / "sub" / "copy-of-a.txt", LOREM)
    write(inbox / "crlf.txt", LOREM.replace(". ", ".\r\n"))
    write(inbox / "lf.txt", LOREM.replace(". ", ".\n"))
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 2
    assert summary["outcomes"]["duplicate"] == 2
    assert len(docs(cfg)) == 2
    statuses = {Path(r["path"]).name: r["status"] for r in rows(cfg, "SELECT * FROM files")}
    assert sorted(statuses.values()) == ["duplicate", "duplicate", "ingested", "ingested"]
    assert len({r["document_id"] for r in rows(cfg, "SELECT * FROM files")}) == 2


def test_duplicates_inside_one_batch_and_across_batches(cfg: Config, inbox: Path) -> None:
    for i in range(7):
        write(inbox / f"f{i}.txt", LOREM + f" variant {i % 3}")
    summary = ingest_paths(cfg, [inbox], batch_size=2)
    assert summary["outcomes"]["ingested"] == 3
    assert summary["outcomes"]["duplicate"] == 4
    assert len(docs(cfg)) == 3


def test_restart_reingest_finds_nothing_new(cfg: Config, inbox: Path) -> None:
    for i in range(5):
        write(inbox / f"doc{i}.md", f"{LOREM} number {i}")
    write(inbox / "bad.txt", b"\xff\xfe\xfa not text")
    first = ingest_paths(cfg, [inbox])
    assert first["outcomes"]["ingested"] == 5 and first["outcomes"]["quarantined"] == 1
    n_chunks, n_events = len(chunks(cfg)), len(rows(cfg, "SELECT * FROM events"))

    # A new process: a new connection to the same file on disk.
    second = ingest_paths(cfg, [inbox])
    assert second["outcomes"]["unchanged"] == 6
    assert second["outcomes"]["ingested"] == 0 and second["outcomes"]["quarantined"] == 0

    # Same content, new mtime (touch, copy -p back and forth): read again, still nothing new.
    for p in inbox.iterdir():
        bump_mtime(p)
    third = ingest_paths(cfg, [inbox])
    assert third["outcomes"]["unchanged"] == 6
    assert len(docs(cfg)) == 6
    assert len(chunks(cfg)) == n_chunks
    # The quarantine was recorded once, not on every pass.
    assert len(events_of(cfg, "ingest.quarantined")) == 1
    assert len(rows(cfg, "SELECT * FROM events")) == n_events


def test_changed_file_supersedes_old_version_and_revives_when_it_comes_back(
    cfg: Config, inbox: Path
) -> None:
    path = write(inbox / "notes.txt", LOREM + " Version one.")
    ingest_paths(cfg, [inbox])
    (v1,) = docs(cfg)

    write(path, LOREM + " Version two, which is longer than the first.")
    bump_mtime(path)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 1
    assert summary["outcomes"]["superseded"] == 1
    old, new = docs(cfg)
    assert old["id"] == v1["id"] and old["status"] == "superseded"
    assert new["status"] == "ingested"
    assert {c["status"] for c in chunks(cfg, old["id"])} == {"superseded"}
    assert {c["status"] for c in chunks(cfg, new["id"])} == {"pending"}
    assert "Version two" in text_of(cfg, new["id"])
    (event,) = events_of(cfg, "ingest.superseded")
    assert event["subject"] == str(path)

    write(path, LOREM + " Version one.")
    bump_mtime(path)
    back = ingest_paths(cfg, [inbox])
    assert back["outcomes"]["ingested"] == 1 and back["outcomes"]["superseded"] == 1
    by_id = {d["id"]: d for d in docs(cfg)}
    assert len(by_id) == 2  # revived, not stored again
    assert by_id[v1["id"]]["status"] == "ingested"
    assert by_id[new["id"]]["status"] == "superseded"
    assert {c["status"] for c in chunks(cfg, v1["id"])} == {"pending"}
    assert len(events_of(cfg, "ingest.revived")) == 1


def test_old_version_stays_while_another_path_carries_it(cfg: Config, inbox: Path) -> None:
    a = write(inbox / "a.txt", LOREM)
    write(inbox / "b.txt", LOREM)
    ingest_paths(cfg, [inbox])
    write(a, LOREM + " and now a has changed a lot")
    bump_mtime(a)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["superseded"] == 0
    assert [d["status"] for d in docs(cfg)] == ["ingested", "ingested"]


def test_ingester_api_and_outcome_callback(cfg: Config, inbox: Path) -> None:
    seen: list[tuple[str, str | None]] = []
    good = write(inbox / "good.txt", LOREM)
    bad = write(inbox / "bad.jsonl", '{"text": "ok line that is long enough"}\n{oops\n')
    db = open_db(cfg.db_path)
    try:
        ingester = Ingester(cfg, db, on_outcome=lambda o, r: seen.append((o, r)))
        first = ingester.ingest_file(good)
        assert first.outcome == "ingested" and first.n_chunks >= 1 and first.document_id
        assert ingester.ingest_file(good).outcome == "unchanged"  # stat fast path: no callback
        q = ingester.ingest_file(bad)
        assert q.outcome == "quarantined" and q.reason == "malformed_jsonl"
        assert q.error is not None and q.error.startswith("malformed_jsonl: line 2:")
        assert ingester.ingest_file(inbox / "gone.txt").outcome == "ignored"
    finally:
        db.conn.close()
    assert seen == [("ingested", None), ("quarantined", "malformed_jsonl"), ("ignored", None)]


# ----------------------------------------------------------------------------- bad input
BAD_FILES = [
    ("empty.txt", b"", "empty"),
    ("blank.md", b"   \n\t\n  ", "empty"),
    ("short.txt", b"hi", "too_short"),
    ("latin1.txt", "Ça coûte très cher, déjà vu, voilà.".encode("latin-1"), "undecodable"),
    ("binary.txt", bytes(range(1, 32)) * 20, "garbage"),
    ("bad.jsonl", b'{"text": "fine line with enough characters"}\n\n[1, 2]\n', "malformed_jsonl"),
    (
        "trunc.jsonl",
        b'{"text": "fine line with enough characters"}\n{"text": "cut',
        "malformed_jsonl",
    ),
    ("noassist.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "malformed_jsonl"),
    ("role.jsonl", b'{"messages": [{"role": "bot", "content": "hi"}]}\n', "malformed_jsonl"),
    ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage", "broken_pdf"),
    ("notpdf.pdf", b"this is not a pdf file at all, just text", "broken_pdf"),
    ("file.docx", b"PK\x03\x04 zip bytes", "unsupported"),
    ("README", b"no suffix, not a known format", "unsupported"),
]


@pytest.mark.parametrize(("name", "data", "reason"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_is_quarantined_with_reason(
    cfg: Config, inbox: Path, name: str, data: bytes, reason: str
) -> None:
    path = write(inbox / name, data)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["quarantined"] == 1, summary
    (doc,) = docs(cfg)
    assert doc["status"] == "quarantined"
    assert doc["error"].startswith(f"{reason}: "), doc["error"]
    assert chunks(cfg) == []
    (event,) = events_of(cfg, "ingest.quarantined")
    assert event["subject"] == str(path)
    assert json.loads(event["data"])["reason"] == reason
    assert summary["errors"] == [{"path": str(path), "error": doc["error"]}]


def test_malformed_jsonl_reason_names_the_line(cfg: Config, inbox: Path) -> None:
    good = json.dumps({"text": "a perfectly fine record of text"})
    write(inbox / "x.jsonl", "\n".join([good, good, "", good, "not json", good]) + "\n")
    ingest_paths(cfg, [inbox])
    (doc,) = docs(cfg)
    assert doc["error"].startswith("malformed_jsonl: line 5: invalid JSON")


def test_too_large_is_quarantined_without_reading(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, max_file_bytes=1000)
    inbox = Path(cfg.inbox_dir)
    write(inbox / "big.txt", LOREM * 20)
    ingest_paths(cfg, [inbox])
    (doc,) = docs(cfg)
    assert doc["status"] == "quarantined" and doc["error"].startswith("too_large: ")


def test_symlinks_inside_ok_outside_quarantined(cfg: Config, inbox: Path, tmp_path: Path) -> None:
    secret = write(tmp_path / "outside" / "secret.txt", "A secret that lives outside the inbox.")
    target = write(inbox / "real.txt", LOREM)
    (inbox / "escape.txt").symlink_to(secret)
    (inbox / "alias.txt").symlink_to(target)
    (inbox / "dangling.txt").symlink_to(inbox / "nowhere.txt")
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"] == {
        "ingested": 1,
        "duplicate": 1,
        "unchanged": 0,
        "superseded": 0,
        "quarantined": 2,
        "ignored": 0,
    }
    errors = {Path(e["path"]).name: e["error"] for e in summary["errors"]}
    assert errors["escape.txt"].startswith("outside_inbox: symlink to ")
    assert errors["dangling.txt"].startswith("unreadable: broken symlink")
    assert all("secret" not in c["text"] for c in chunks(cfg))


def test_symlinks_ignored_when_not_followed(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, follow_symlinks=False)
    inbox = Path(cfg.inbox_dir)
    target = write(inbox / "real.txt", LOREM)
    (inbox / "alias.txt").symlink_to(target)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 1 and summary["outcomes"]["ignored"] == 1


def test_hidden_and_temporary_files_are_ignored(cfg: Config, inbox: Path) -> None:
    for name in (".hidden.txt", ".notes.md.swp", "download.txt.part", "x.tmp", "draft.txt~"):
        write(inbox / name, LOREM)
    write(inbox / ".git" / "config.txt", LOREM)
    write(inbox / "real.txt", LOREM + " real")
    summary = ingest_paths(cfg, [inbox])
    assert summary["files"] == 1 and summary["outcomes"]["ingested"] == 1


def test_fixed_file_replaces_its_quarantined_version(cfg: Config, inbox: Path) -> None:
    path = write(inbox / "data.jsonl", '{"text": "first record, fine and long"}\n{"text": \n')
    ingest_paths(cfg, [inbox])
    write(path, '{"text": "first record, fine and long"}\n{"text": "second record, fixed"}\n')
    bump_mtime(path)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 1
    statuses = [d["status"] for d in docs(cfg)]
    assert statuses == ["quarantined", "ingested"]
    (file_row,) = rows(cfg, "SELECT * FROM files")
    assert file_row["status"] == "ingested" and file_row["error"] is None


# ----------------------------------------------------------------------------- PII
def test_pii_scrub_replaces_emails_and_phones(state_dir: Path) -> None:
    text = (
        "Contact jane.doe+work@example.co.uk or call +44 20 7946 0958, "
        "or (555) 123-4567 in the US. Released 2024-01-15, version 3.14.159, "
        "server 192.168.100.200, order number 12345678."
    )
    for scrub in (True, False):
        sub = state_dir / f"s{scrub}"
        cfg = make_cfg(sub, pii_scrub=scrub)
        write(Path(cfg.inbox_dir) / "pii.txt", text)
        ingest_paths(cfg, [Path(cfg.inbox_dir)])
        (doc,) = docs(cfg)
        out = text_of(cfg, doc["id"])
        if scrub:
            assert "jane.doe" not in out and "7946" not in out and "123-4567" not in out
            assert out.count("[EMAIL]") == 1 and out.count("[PHONE]") == 2
            for keep in ("2024-01-15", "3.14.159", "192.168.100.200", "12345678"):
                assert keep in out
        else:
            assert out == text


def test_pii_scrub_applies_to_chat_examples(state_dir: Path) -> None:
    cfg = make_cfg(state_dir, pii_scrub=True)
    write(
        Path(cfg.inbox_dir) / "chat.jsonl",
        jsonl({"prompt": "Who do I email?", "completion": "Write to help@example.com please."}),
    )
    ingest_paths(cfg, [Path(cfg.inbox_dir)])
    (chunk,) = chunks(cfg)
    assert json.loads(chunk["text"])[1]["content"] == "Write to [EMAIL] please."


# ----------------------------------------------------------------------------- cli
def test_cli_ingest_and_status_json(cfg: Config, inbox: Path) -> None:
    from click.testing import CliRunner

    from daemon.cli import main

    write(inbox / "a.txt", LOREM)
    write(inbox / "b.txt", b"\x00\x01\x02\x03" * 40)
    runner = CliRunner()
    base = ["--state-dir", cfg.state_dir]
    result = runner.invoke(main, [*base, "ingest", "--json", str(inbox)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["outcomes"]["ingested"] == 1 and summary["outcomes"]["quarantined"] == 1

    result = runner.invoke(main, [*base, "status", "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["documents"]["ingested"] == 1
    assert status["documents"]["quarantined"] == 1
    assert status["quarantined_by_reason"] == {"garbage": 1}
    assert status["pending_tokens"] > 0
    assert status["last_errors"][0]["kind"] == "ingest.quarantined"

    result = runner.invoke(main, [*base, "ingest", str(inbox)])
    assert result.exit_code == 0 and "unchanged" in result.stdout


def test_every_quarantine_reason_has_a_metrics_label() -> None:
    from daemon.ingest.parsers import REASONS
    from daemon.metrics import QUARANTINE_REASONS

    assert set(REASONS) <= set(QUARANTINE_REASONS)


def test_empty_file_filled_later_is_ingested_without_a_false_supersede(
    cfg: Config, inbox: Path
) -> None:
    path = write(inbox / "later.txt", b"")
    write(inbox / "other-empty.txt", b"")
    first = ingest_paths(cfg, [inbox])
    assert first["outcomes"]["quarantined"] == 2
    assert len(docs(cfg)) == 1  # one empty content, stored once
    write(path, LOREM)
    bump_mtime(path)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 1 and summary["outcomes"]["superseded"] == 0
    assert events_of(cfg, "ingest.superseded") == []
    (row,) = rows(cfg, "SELECT status FROM files WHERE path = ?", (str(path),))
    assert row["status"] == "ingested"


def test_lone_surrogates_from_json_escapes_are_replaced_not_fatal(cfg: Config, inbox: Path) -> None:
    write(inbox / "s.jsonl", '{"text": "broken escape \\ud800 inside an otherwise fine record"}\n')
    write(inbox / "ok.txt", LOREM)
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 2, summary
    assert any("\ufffd" in c["text"] for c in chunks(cfg))


def test_one_failing_file_does_not_poison_its_batch(
    cfg: Config, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: storing one file raises; the rest of the batch still lands."""
    from store import documents as documents_mod

    real_insert = documents_mod.insert_document

    def flaky_insert(db: Any, **kw: Any) -> int:
        if kw["path"].endswith("poison.txt") and kw["status"] == "ingested":
            raise ValueError("injected failure")
        return real_insert(db, **kw)

    monkeypatch.setattr(documents_mod, "insert_document", flaky_insert)
    for name in ("a.txt", "poison.txt", "z.txt"):
        write(inbox / name, f"{LOREM} {name}")
    summary = ingest_paths(cfg, [inbox])
    assert summary["outcomes"]["ingested"] == 2
    assert summary["outcomes"]["quarantined"] == 1
    (err,) = summary["errors"]
    assert err["path"].endswith("poison.txt")
    assert err["error"].startswith("unreadable: internal error: ValueError")
    assert chunks(cfg) and all("poison" not in c["text"] for c in chunks(cfg))


def test_html_without_elements_is_empty(cfg: Config, inbox: Path) -> None:
    write(inbox / "c.html", "<!-- only a comment -->")
    ingest_paths(cfg, [inbox])
    (doc,) = docs(cfg)
    assert doc["error"].startswith("empty: ")


def test_concurrent_ingests_of_the_same_files_store_each_once(cfg: Config, inbox: Path) -> None:
    """Two processes' worth of connections race over one inbox (e.g. CLI and daemon)."""
    import threading

    for i in range(60):
        write(inbox / f"f{i:02d}.txt", f"{LOREM} file {i}")
    write(inbox / "dup.txt", f"{LOREM} file 7")
    results: list[dict[str, Any]] = []

    def run() -> None:
        results.append(ingest_paths(cfg, [inbox], batch_size=7))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert sum(r["outcomes"]["ingested"] for r in results) == 60
    assert sum(r["outcomes"]["duplicate"] for r in results) == 1
    assert len(docs(cfg)) == 60
    assert len(rows(cfg, "SELECT * FROM files")) == 61
    per_doc = rows(cfg, "SELECT document_id, COUNT(*) AS n FROM chunks GROUP BY document_id")
    assert len(per_doc) == 60 and {r["n"] for r in per_doc} == {1}
