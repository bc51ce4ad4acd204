"""HTML pages: the main text as Markdown-ish lines, without scripts, styles and page furniture.

The standard library's `html.parser` is enough: we need the text and its block structure, not a
DOM. Navigation, banners, footers and sidebars are dropped; when the page marks its content with
`<main>` or `<article>`, only that is kept. Headings become Markdown headings, list items "- " lines
and table rows "a | b" lines.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from services.ingest.extract import Extracted, single_page
from services.ingest.formats.text import decode_text

# never text a reader sees
_INVISIBLE = {
    "script",
    "style",
    "noscript",
    "template",
    "svg",
    "math",
    "iframe",
    "object",
    "canvas",
    "select",
    "button",
    "head",
}  # <head>: only its <title> is kept, separately
# page furniture around the content
_BOILERPLATE = {"nav", "aside", "form", "dialog"}
# a page's banner and footer; inside <article>/<main> they belong to the content (e.g. its title)
_FURNITURE = {"header", "footer"}
_BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar"}
_MAIN = {"main", "article"}
_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "param",
    "source",
    "track",
    "wbr",
}
_BLOCK = {
    "p",
    "div",
    "section",
    "blockquote",
    "pre",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "table",
    "tr",
    "figure",
    "figcaption",
    "address",
    "details",
    "summary",
    "hr",
    "br",
    "body",
    "html",
    "li",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "main",
    "article",
    "header",
    "footer",
    "caption",
    "thead",
    "tbody",
    "tfoot",
    "center",
}
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_SPACES = re.compile(r"[ \t\r\n\f\v\u00a0]+")
_BREAK = "\x1e"  # stands for <br> until the block's whitespace is collapsed


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title_parts: list[str] = []
        # blocks: (text, kind "block" | "item" | "row", inside <main>/<article>)
        self.blocks: list[tuple[str, str, bool]] = []
        self._line: list[str] = []
        self._prefix = ""
        self._kind = "block"
        self._stack: list[tuple[str, bool]] = []  # (tag, opened a skipped region)
        self._skip = 0
        self._main = 0
        self._pre = 0
        self._in_title = False

    # a block boundary: whatever text was gathered becomes one block
    def _flush(self) -> None:
        text = "".join(self._line)
        if self._pre:
            text = text.strip("\n")
        else:
            # a <br> inside a list item or table cell must not break the Markdown line
            joiner = "\n" if self._kind == "block" else " "
            text = joiner.join(_SPACES.sub(" ", part).strip() for part in text.split(_BREAK)).strip()
        if self._kind == "row":
            text = text.strip(" |")
        if text:
            if self._kind == "row":
                text = f"| {text} |"
            self.blocks.append((self._prefix + text, self._kind, self._main > 0))
        self._line, self._prefix, self._kind = [], "", "block"

    def _skipped(self, tag: str, attrs: dict) -> bool:
        if tag in _INVISIBLE or tag in _BOILERPLATE:
            return True
        if tag in _FURNITURE and self._main == 0:
            return True
        if attrs.get("role", "").lower() in _BOILERPLATE_ROLES:
            return True
        if "hidden" in attrs or attrs.get("aria-hidden", "").lower() == "true":
            return True
        style = attrs.get("style", "").replace(" ", "").lower()
        return "display:none" in style or "visibility:hidden" in style

    def handle_starttag(self, tag: str, attrs_list) -> None:
        attrs = {k.lower(): (v or "") for k, v in attrs_list}
        if tag == "title":
            # the document's <title> lives in the skipped <head>; an <svg>'s title is not it
            self._in_title = not self.title_parts and not any(t in ("svg", "math") for t, _ in self._stack)
            return
        if tag in _VOID:
            if tag == "br" and not self._skip:
                self._line.append("\n" if self._pre else _BREAK)
            return
        skipped = self._skipped(tag, attrs)
        self._stack.append((tag, skipped))
        if skipped:
            self._skip += 1
            return
        if self._skip:
            return
        if tag in _MAIN or attrs.get("role", "").lower() == "main":
            self._main += 1
            self._stack.append(("\x00main", False))
        if tag in ("td", "th"):
            self._line.append(" | ")
        elif tag in _BLOCK or tag in _HEADINGS:
            self._flush()
        if tag in _HEADINGS:
            self._prefix = "#" * _HEADINGS[tag] + " "
        elif tag == "li":
            self._prefix, self._kind = "- ", "item"
        elif tag == "tr":
            self._kind = "row"
        elif tag == "pre":
            self._pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            return
        if tag in _VOID:
            return
        # close up to the matching open tag; browsers forgive missing end tags, so do we
        for depth in range(len(self._stack) - 1, -1, -1):
            if self._stack[depth][0] == tag:
                break
        else:
            return
        while len(self._stack) > depth:
            open_tag, skipped = self._stack.pop()
            if skipped:
                self._skip -= 1
            elif open_tag == "\x00main":
                self._flush()
                self._main -= 1
            elif not self._skip and (open_tag in _BLOCK or open_tag in _HEADINGS):
                self._flush()
                if open_tag == "pre":
                    self._pre = max(0, self._pre - 1)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif not self._skip:
            self._line.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def _charset(data: bytes) -> str | None:
    found = _META_CHARSET.search(data[:4096])
    return found.group(1).decode("ascii") if found else None


def _render(blocks: list[tuple[str, str]]) -> str:
    """Blocks apart by a blank line; list items and table rows one per line, tables as Markdown."""
    out: list[str] = []
    previous = None
    for text, kind in blocks:
        if kind != "block" and kind == previous:
            out[-1] += "\n" + text
            if kind == "row" and out[-1].count("\n") == 1:
                header = out[-1].split("\n")[0]
                separator = "|" + "---|" * max(1, header.count(" | ") + 1)
                out[-1] = f"{header}\n{separator}\n{text}"
        else:
            out.append(text)
        previous = kind
    return "\n\n".join(out)


def extract(data: bytes) -> Extracted:
    """The page's main text with its title as the first heading."""
    parser = _TextParser()
    parser.feed(decode_text(data, _charset(data)))
    parser.close()
    main = [(text, kind) for text, kind, in_main in parser.blocks if in_main]
    blocks = main or [(text, kind) for text, kind, _ in parser.blocks]
    title = _SPACES.sub(" ", "".join(parser.title_parts)).strip() or None
    if title is None:
        title = next((t.lstrip("#").strip() for t, _ in blocks if t.startswith("# ")), None)
    if title and not any(t.lstrip("#").strip() == title for t, _ in blocks[:3]):
        blocks.insert(0, (f"# {title}", "block"))
    return single_page(_render(blocks), title=title)
