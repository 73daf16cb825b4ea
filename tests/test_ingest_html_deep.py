"""HTML nested deeper than libxml2's limit (256) is stored whole, not cut short.

libxml2 stops building its tree at 256 levels and silently drops the rest of the
document; these files go through the real pipeline into a real store, and the text that
follows the deep part must be there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Config
from daemon.ingest import htmltext
from daemon.ingest.pipeline import ingest_paths
from tests.ingest_helpers import docs, text_of

AFTER = "After the deep part comes ordinary prose that must be stored as well."


def _deep(levels: int, tail: str = f"<p>{AFTER}</p>") -> str:
    return (
        "<html><head><title>Deep</title></head><body><p>An introduction paragraph.</p>"
        + "<div>" * levels
        + "the deepest words"
        + "</div>" * levels
        + tail
        + "</body></html>"
    )


def _ingest_one(cfg: Config, tmp_path: Path, name: str, html: str) -> str:
    inbox = Path(cfg.inbox_dir)
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / name).write_text(html, encoding="utf-8")
    summary = ingest_paths(cfg, [inbox / name])
    assert summary["outcomes"]["ingested"] == 1, summary
    (doc,) = [d for d in docs(cfg) if d["path"].endswith(name)]
    assert doc["status"] == "ingested"
    return text_of(cfg, doc["id"])


@pytest.mark.parametrize("levels", [300, 5000])
def test_deeply_nested_html_keeps_the_text_after_the_deep_part(
    cfg: Config, tmp_path: Path, levels: int
) -> None:
    tail = f"<p>{AFTER}</p><ul><li>alpha item</li><li>beta item</li></ul>"
    text = _ingest_one(cfg, tmp_path, f"deep{levels}.html", _deep(levels, tail))
    assert "An introduction paragraph." in text
    assert "the deepest words" in text
    assert AFTER in text
    # Flattened and rendered by inscriptis again: the list after the deep part keeps its
    # bullets (the plain fallback would lose them).
    assert "* alpha item" in text and "* beta item" in text
    assert "Deep" not in text  # the <title> is not content


def test_deep_nesting_libxml2_closes_differently_falls_back_to_plain_text(
    cfg: Config, tmp_path: Path
) -> None:
    # libxml2 will not let </div> close a <td>, so these nest 5 levels per repeat although
    # every <div> is "closed"; the flattening depth count cannot see that.
    repeats = 400
    html = "<body><p>Start of the table soup.</p>"
    html += "".join(f"<div><table><tr><td>cell{i}</div>" for i in range(repeats))
    html += f"<p>{AFTER}</p></body>"
    text = _ingest_one(cfg, tmp_path, "soup.html", html)
    assert "Start of the table soup." in text
    assert all(f"cell{i}" in text for i in range(repeats))
    assert AFTER in text


def test_ordinary_html_is_rendered_exactly_as_inscriptis_does() -> None:
    from inscriptis import get_text

    html = (
        "<html><body><h1>Title</h1><p>One <b>bold</b> word.</p>"
        "<table><tr><td>a</td><td>b</td></tr></table><ul><li>x</li></ul></body></html>"
    )
    assert htmltext.to_text(html) == get_text(html)


def test_huge_text_node_is_kept() -> None:
    # libxml2 refuses a text node over 10 MB (another limit that drops the whole rest).
    body = "word " * 2_200_000
    text = htmltext.to_text(f"<html><body><p>{body}</p><p>{AFTER}</p></body></html>")
    assert text.count("word") == 2_200_000
    assert AFTER in text
