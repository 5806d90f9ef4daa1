"""Documents -> chunks for retrieval.

A document is ``{"id", "text", "title"?, "lang"?, "source"?}`` (the shape ``lmstack.apps.support.kb_documents``
and ``lmstack.data`` readers produce). Markdown is cut at headings; within a section, paragraphs (blank-line
separated blocks) are packed greedily up to ``max_chars``; a paragraph longer than that is cut at sentence
ends (or hard, as a last resort). Each chunk's ``title`` is the document title plus its section heading, so a
chunk read alone still says where it comes from.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_SENT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")  # "1.2 kg" stays whole


@dataclass
class Chunk:
    id: str  # "<doc id>#<n>"
    doc_id: str
    text: str  # what a prompt shows
    title: str = ""
    lang: str = ""
    source: str = ""
    keywords: str = ""  # extra text that is searched but not shown (e.g. other ways of asking an FAQ)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split_long(block: str, max_chars: int) -> list[str]:
    if len(block) <= max_chars:
        return [block]
    out, cur = [], ""
    for sent in (s for s in _SENT.split(block) if s):
        while len(sent) > max_chars:  # one sentence longer than a chunk: hard cut
            if cur:
                out.append(cur)
                cur = ""
            out.append(sent[:max_chars])
            sent = sent[max_chars:]
        if cur and len(cur) + 1 + len(sent) > max_chars:
            out.append(cur)
            cur = sent
        else:
            cur = f"{cur} {sent}".strip() if cur and not cur.endswith(("。", "！", "？")) else cur + sent
    if cur:
        out.append(cur)
    return out


def chunk_text(text: str, max_chars: int = 400) -> list[tuple[str, str]]:
    """``[(section heading, chunk text)]``: markdown sections, paragraphs packed up to ``max_chars``."""
    if max_chars < 20:
        raise ValueError(f"max_chars must be at least 20, got {max_chars}")
    sections: list[tuple[str, list[str]]] = [("", [])]
    for block in re.split(r"\n\s*\n", text.strip()):
        block = block.strip()
        if not block:
            continue
        first, _, rest = block.partition("\n")
        m = _HEADING.match(first)
        if m:
            level = len(m.group(1))
            heading = m.group(2).strip()
            if level == 1 and not sections[-1][1] and not sections[-1][0]:
                sections[-1] = ("", [])  # the page title: carried by the document title
            else:
                sections.append((heading, []))
            block = rest.strip()
            if not block:
                continue
        sections[-1][1].extend(_split_long(block, max_chars))
    out: list[tuple[str, str]] = []
    for heading, blocks in sections:
        cur = ""
        for b in blocks:
            if cur and len(cur) + 2 + len(b) > max_chars:
                out.append((heading, cur))
                cur = b
            else:
                cur = f"{cur}\n\n{b}" if cur else b
        if cur:
            out.append((heading, cur))
    return out


def _title_of(doc: dict[str, Any]) -> str:
    if doc.get("title"):
        return str(doc["title"])
    first = str(doc.get("text", "")).strip().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first else ""


def chunk_documents(docs: Iterable[dict[str, Any]], max_chars: int = 400) -> list[Chunk]:
    """Chunks of every document, in document order. A document needs ``id`` and ``text``."""
    out: list[Chunk] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise ValueError(f"document {i + 1}: expected an object with a 'text' string")
        doc_id = str(doc.get("id") or f"doc{i + 1}")
        title = _title_of(doc)
        for n, (heading, text) in enumerate(chunk_text(doc["text"], max_chars)):
            out.append(Chunk(id=f"{doc_id}#{n}", doc_id=doc_id, text=text,
                             title=f"{title} > {heading}" if heading else title,
                             lang=str(doc.get("lang") or ""), source=str(doc.get("source") or "")))
    return out
