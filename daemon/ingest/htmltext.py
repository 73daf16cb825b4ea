"""HTML to text for any document, however deep its nesting.

inscriptis renders a tree that lxml (libxml2) builds, and libxml2 stops building at 256
levels of nesting (or at a text node over 10 MB): it records a FATAL "resource limit"
error and drops *everything* after that point, without raising. So the tree is built
here with a parser of our own whose error log is read:

1. no fatal error: inscriptis renders the tree (every ordinary document);
2. otherwise the markup is *flattened*: tags nested deeper than :data:`FLATTEN_DEPTH`
   are cut out (their text stays where it was), and the flat markup is parsed again;
3. a document that still trips a limit (libxml2 closes elements by rules our depth count
   does not mirror, or one text node is huge) gets plain text from the standard
   library's tokenizer, which builds no tree: a line break per block element.

No step drops text, so a deep document is stored whole, never cut short.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import lxml.etree
import lxml.html
from inscriptis.html_engine import Inscriptis

# Well below libxml2's 256 (which counts the <html> and <body> it adds), and shallow
# enough for inscriptis' recursive renderer.
FLATTEN_DEPTH = 200

_XML_DECLARATION = re.compile(r"^<\?xml [^>]+?\?>")


def _tags(names: str) -> frozenset[str]:
    return frozenset(names.split())


# Elements that never have children, and siblings that close an open one of their kind.
_VOID = _tags("area base basefont br col embed frame hr img input keygen link meta param source")
_VOID |= _tags("track wbr")
_SIBLING_CLOSES = _tags("p li dt dd option tr td th thead tbody tfoot")
_RAW_TEXT = _tags("script style")  # their content is text to the tokenizer
_HIDDEN = _tags("head script style title")  # what inscriptis does not render
_BLOCK = _tags("address article aside blockquote br dd div dl dt figcaption figure footer form")
_BLOCK |= _tags("h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tr ul")


def to_text(html: str) -> str:
    """The text of ``html`` (already decoded); see the module docstring for the steps."""
    text = _render(html)
    if text is not None:
        return text
    scan = _Scan(html)
    text = _render(scan.flattened())
    return text if text is not None else scan.plain_text()


def _render(html: str) -> str | None:
    """inscriptis' text of ``html``, or None when libxml2 hit a limit (a cut-short tree).

    Builds the tree as ``inscriptis.get_text`` does, with a parser whose errors we see.
    """
    html = html.strip()
    if not html:
        return ""
    if html.startswith("<?xml "):
        html = _XML_DECLARATION.sub("", html, count=1)
    parser = lxml.html.HTMLParser()
    try:
        tree = lxml.html.document_fromstring(html, parser=parser)
    except lxml.etree.ParserError:
        tree = lxml.html.document_fromstring("<pre>" + html + "</pre>", parser=parser)
    if any(e.level == lxml.etree.ErrorLevels.FATAL for e in parser.error_log):
        return None
    text: str = Inscriptis(tree).get_text()
    return text


class _Scan(HTMLParser):
    """One pass of the standard tokenizer over a document: the spans of the tags to cut
    for :meth:`flattened`, and the plain text for :meth:`plain_text`.

    Depth is counted as libxml2 mostly does (void elements have no children, an end tag
    closes everything opened after its start tag, a ``<p>`` or ``<li>`` closes an open
    sibling), and rather too deep than too shallow: too deep only flattens a little more.
    """

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.html = html
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", html)]
        self._stack: list[tuple[str, bool]] = []  # (tag, kept)
        self._kept = 0
        self._cuts: list[tuple[int, int]] = []
        self._parts: list[str] = []
        self._hidden = 0
        self.feed(html)
        self.close()

    def _offset(self) -> int:
        line, col = self.getpos()
        return self._line_starts[line - 1] + col

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._text_for_start(tag)
        if tag in _VOID:
            return
        if tag in _SIBLING_CLOSES and self._stack and self._stack[-1][0] == tag:
            self._pop()
        keep = self._kept < FLATTEN_DEPTH or tag in _RAW_TEXT
        if not keep:
            start = self._offset()
            self._cuts.append((start, start + len(self.get_starttag_text() or "")))
        self._stack.append((tag, keep))
        self._kept += keep

    def handle_endtag(self, tag: str) -> None:
        self._text_for_end(tag)
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                break
        else:
            return  # closes nothing open: libxml2 ignores it too
        while len(self._stack) > i + 1:
            self._pop()
        if not self._pop():
            start = self._offset()
            end = self.html.find(">", start)
            self._cuts.append((start, len(self.html) if end < 0 else end + 1))

    def _pop(self) -> bool:
        _, kept = self._stack.pop()
        self._kept -= kept
        return kept

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self._parts.append(data)

    def _text_for_start(self, tag: str) -> None:
        if tag == "body":
            self._hidden = 0  # an unclosed <head> ends here
        elif tag in _HIDDEN:
            self._hidden += 1
        if tag in _BLOCK:
            self._parts.append("\n")
        elif tag in ("td", "th"):
            self._parts.append(" ")

    def _text_for_end(self, tag: str) -> None:
        if tag in _HIDDEN and self._hidden:
            self._hidden -= 1
        if tag in _BLOCK:
            self._parts.append("\n")

    def flattened(self) -> str:
        """The document with the tags nested deeper than :data:`FLATTEN_DEPTH` cut out."""
        out: list[str] = []
        pos = 0
        for start, end in sorted(self._cuts):
            out.append(self.html[pos:start])
            pos = max(pos, end)
        out.append(self.html[pos:])
        return "".join(out)

    def plain_text(self) -> str:
        """Every rendered text node, a line break per block element, spaces collapsed."""
        text = re.sub(r"[^\S\n]+", " ", "".join(self._parts))
        return re.sub(r" ?\n ?", "\n", text).strip()
