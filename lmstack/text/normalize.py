"""Text normalization: Unicode NFKC, control characters, whitespace, HTML to text, cheap mojibake repair.

Each function is pure and returns the new text; :func:`normalize_text` chains them by options and
reports which changes it made (for the pipeline report).

Mojibake: the common case is UTF-8 bytes decoded as Latin-1 / cp1252 ("cafÃ©" for "café",
"ä¸­æ–‡" for "中文"). We repair it only when the text contains the telltale lead characters AND a round trip
through cp1252/latin-1 -> UTF-8 succeeds and reduces the count of those characters (the idea of ``ftfy``,
restricted to this one cheap, safe case).
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser

# C0/C1 control characters except tab and newline; also zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\ufffe]")
_HSPACE = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_TRAIL = re.compile(r"[ \t]+\n")
_MANY_NL = re.compile(r"\n{3,}")
_MOJIBAKE = re.compile(r"[ÃÂâäåæçèéïð][\x80-\xbf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]")
_HTML_HINT = re.compile(r"<(?:html|body|div|p|br|span|a|table|li|h[1-6]|head|title|script|style)\b", re.I)


def strip_control(text: str) -> str:
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def normalize_whitespace(text: str) -> str:
    """Collapse runs of horizontal space to one space, strip line ends, at most one blank line in a row."""
    text = _HSPACE.sub(" ", text)
    text = _TRAIL.sub("\n", text)
    text = _MANY_NL.sub("\n\n", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


_CP1252_RUN = re.compile(r"[\x20-\xff\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]+")


def _fix_run(m: re.Match) -> str:
    run = m.group()
    bad = len(_MOJIBAKE.findall(run))
    if bad == 0:
        return run
    for enc in ("cp1252", "latin-1"):
        try:
            fixed = run.encode(enc).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if len(_MOJIBAKE.findall(fixed)) < bad:
            return fixed
    return run


def fix_mojibake(text: str) -> str:
    """Undo UTF-8-read-as-cp1252/latin-1 run by run when that clearly helps; otherwise leave the text."""
    if not _MOJIBAKE.search(text):
        return text
    return _CP1252_RUN.sub(_fix_run, text)


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "noscript", "head", "template", "svg", "iframe"}
    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
              "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "hr", "title", "dd", "dt", "nav"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML document: scripts/styles dropped, block elements become line breaks."""
    p = _TextExtractor()
    p.feed(markup)
    p.close()
    return normalize_whitespace("".join(p.parts))  # convert_charrefs=True already unescaped entities


def looks_like_html(text: str) -> bool:
    return len(_HTML_HINT.findall(text[:5000])) >= 2


# Full-width punctuation that NFKC would turn into ASCII (，。is kept anyway: 。 has no compatibility mapping).
# Chinese text uses these on purpose, so by default NFKC leaves them alone (full-width letters/digits still fold).
_CJK_PUNCT = re.compile(r"[\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]+")


def _nfkc(text: str, keep_cjk_punct: bool = True) -> str:
    """Unicode NFKC; with ``keep_cjk_punct`` full-width punctuation (，！？：；（）) is kept as is."""
    if not keep_cjk_punct or text.isascii():
        return unicodedata.normalize("NFKC", text)
    out, pos = [], 0
    for m in _CJK_PUNCT.finditer(text):
        out.append(unicodedata.normalize("NFKC", text[pos:m.start()]))
        out.append(m.group())
        pos = m.end()
    out.append(unicodedata.normalize("NFKC", text[pos:]))
    return "".join(out)


def normalize_text(text: str, *, nfkc: bool = True, control: bool = True, whitespace: bool = True,
                   html_mode: str = "auto", mojibake: bool = True, keep_cjk_punct: bool = True
                   ) -> tuple[str, list[str]]:
    """Apply the chosen normalizations in a fixed order; return (text, names of those that changed it).

    ``html_mode``: ``"auto"`` (convert when the text looks like HTML), ``"always"`` or ``"never"``."""
    changed: list[str] = []
    if html_mode == "always" or (html_mode == "auto" and "<" in text and looks_like_html(text)):
        new = html_to_text(text)
        if new != text:
            changed.append("html")
            text = new
    if mojibake:
        new = fix_mojibake(text)
        if new != text:
            changed.append("mojibake")
            text = new
    if nfkc:
        new = _nfkc(text, keep_cjk_punct)
        if new != text:
            changed.append("nfkc")
            text = new
    if control:
        new = strip_control(text)
        if new != text:
            changed.append("control")
            text = new
    if whitespace:
        new = normalize_whitespace(text)
        if new != text:
            changed.append("whitespace")
            text = new
    return text, changed


_DEDUP_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def dedup_key_text(text: str) -> str:
    """The text exact dedup compares: NFKC, lower case, punctuation and whitespace removed."""
    return _DEDUP_PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
