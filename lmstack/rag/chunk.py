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


# ---- token-bounded chunks with overlap and character offsets (the RAG product: lmstack rag index) ----

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\sA-Za-z0-9]")
# a sentence ends at . ! ? (then a space or the end) or at Chinese 。！？； (no space follows those), or a line end
_SENT_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|[。！？；]+[”’」』）]*|\n")


def count_tokens(text: str) -> int:
    """A tokenizer-free token count: each Latin word or number, each Han character and each other symbol is one
    (close to a BPE count for English prose, and to a character count for Chinese)."""
    return len(_TOKEN.findall(text))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the sentences of ``text`` (whitespace trimmed), English and Chinese punctuation."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        out.append((start, m.end()))
        start = m.end()
    out.append((start, len(text)))
    spans = []
    for s, e in out:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            spans.append((s, e))
    return spans


def _hard_cut(text: str, s: int, e: int, max_tokens: int) -> list[tuple[int, int]]:
    """A span longer than ``max_tokens`` cut every ``max_tokens`` tokens."""
    toks = [m.span() for m in _TOKEN.finditer(text, s, e)]
    if len(toks) <= max_tokens:
        return [(s, e)]
    return [(toks[i][0], toks[min(i + max_tokens, len(toks)) - 1][1]) for i in range(0, len(toks), max_tokens)]


@dataclass
class Piece:
    """One chunk of a loaded document: ``text == document_text[start:end]``."""
    text: str
    start: int
    end: int
    headings: tuple[str, ...]
    page: int | None
    tokens: int


def chunk_blocks(blocks: list[Any], chunk_tokens: int = 256, overlap: int = 32) -> list[Piece]:
    """Chunks of a document's blocks (:class:`lmstack.rag.loaders.Block`: text, headings, page; joined by blank
    lines into the document text). A chunk never crosses a heading or a page; within a section sentences are
    packed up to ``chunk_tokens`` (:func:`count_tokens`), a chunk ends at a paragraph end when the next paragraph
    does not fit and the chunk is at least half full, a sentence longer than a chunk is cut hard, and each chunk
    after the first of a section starts with the previous chunk's last sentences of at most ``overlap`` tokens."""
    if chunk_tokens < 8:
        raise ValueError(f"chunk_tokens must be at least 8, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap must be in [0, chunk_tokens), got {overlap}")
    doc = "\n\n".join(b.text for b in blocks)
    out: list[Piece] = []
    pos, i = 0, 0
    while i < len(blocks):  # one section: consecutive blocks with the same heading path and page
        key = (tuple(blocks[i].headings), blocks[i].page)
        sents: list[tuple[int, int, int, bool]] = []  # (start, end, tokens, paragraph ends here)
        while i < len(blocks) and (tuple(blocks[i].headings), blocks[i].page) == key:
            spans = []
            for s, e in sentence_spans(blocks[i].text):
                spans += _hard_cut(blocks[i].text, s, e, chunk_tokens)
            for j, (s, e) in enumerate(spans):
                sents.append((pos + s, pos + e, count_tokens(blocks[i].text[s:e]), j == len(spans) - 1))
            pos += len(blocks[i].text) + 2
            i += 1
        cur: list[tuple[int, int, int, bool]] = []
        fresh = 0  # sentences of cur not carried over from the previous chunk

        def emit() -> None:
            toks = sum(t for _, _, t, _ in cur)
            out.append(Piece(doc[cur[0][0]:cur[-1][1]], cur[0][0], cur[-1][1], key[0], key[1], toks))

        for n, sent in enumerate(sents):
            used = sum(t for _, _, t, _ in cur)
            if cur and fresh and (used + sent[2] > chunk_tokens or (
                    cur[-1][3] and used >= chunk_tokens // 2 and used + _para_tokens(sents, n) > chunk_tokens)):
                emit()
                keep: list[tuple[int, int, int, bool]] = []
                for prev in reversed(cur):
                    if sum(t for _, _, t, _ in keep) + prev[2] > overlap or \
                            sum(t for _, _, t, _ in keep) + prev[2] + sent[2] > chunk_tokens:
                        break
                    keep.insert(0, prev)
                cur, fresh = keep, 0
            cur.append(sent)
            fresh += 1
        if cur and fresh:
            emit()
    return out


def _para_tokens(sents: list[tuple[int, int, int, bool]], n: int) -> int:
    """Tokens of the paragraph that starts at sentence ``n``."""
    total = 0
    for s in sents[n:]:
        total += s[2]
        if s[3]:
            break
    return total
