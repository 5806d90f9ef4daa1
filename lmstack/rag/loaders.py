"""Files -> documents for the RAG index: text blocks with their heading path and page.

    doc = load_file("manual.pdf")      # LoadedDoc(source, title, blocks=[Block(text, headings, page), ...])
    doc.text                          # the blocks joined by blank lines: chunk offsets point into it

| suffix | how |
|---|---|
| ``.txt`` | paragraphs (blank-line separated) |
| ``.md`` / ``.markdown`` | ATX headings (``#`` .. ``######``) build the heading path; paragraphs under them |
| ``.html`` / ``.htm`` | main-text extraction with ``trafilatura`` (boilerplate, menus and footers dropped), as markdown |
| ``.pdf`` | ``pypdf``: each page's text, paragraphs kept with their page number (1-based) |
| ``.docx`` | ``python-docx``: paragraphs; ``Heading N`` styles build the heading path, ``Title`` is the title |
| ``.jsonl`` | one block per row: its ``text`` (or ``content``) field, headed by its ``title`` when it has one |
| ``.csv`` | one block per row: ``column: value`` pairs |

A file is read whole under :data:`MAX_FILE_BYTES` (a larger one is refused with that reason), and a file that
fails to parse raises :class:`~lmstack.errors.DataError` naming it and why, so an index run can report it and
go on with the rest. The loaders' packages are imported only for their own file types (``lmstack[rag]``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.errors import DataError

MAX_FILE_BYTES = 64 * 1024 * 1024
SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".jsonl", ".csv")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass
class Block:
    text: str
    headings: tuple[str, ...] = ()  # the heading path above this block ("Returns", "Refunds")
    page: int | None = None  # 1-based PDF page


@dataclass
class LoadedDoc:
    source: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    SEP = "\n\n"

    @property
    def text(self) -> str:
        return self.SEP.join(b.text for b in self.blocks)

    def offsets(self) -> list[int]:
        """The start of each block in :attr:`text`."""
        out, pos = [], 0
        for b in self.blocks:
            out.append(pos)
            pos += len(b.text) + len(self.SEP)
        return out


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]


def markdown_blocks(text: str, page: int | None = None) -> tuple[str, list[Block]]:
    """(first level-1 heading or "", blocks): headings become the heading path of the paragraphs under them."""
    title, path, blocks = "", [], []  # path: [(level, heading)]
    for para in _paragraphs(text):
        lines = para.split("\n")
        body: list[str] = []
        for line in lines:
            m = _HEADING.match(line.strip())
            if not m:
                body.append(line)
                continue
            if body:
                blocks.append(Block("\n".join(body).strip(), tuple(h for _, h in path), page))
                body = []
            level, heading = len(m.group(1)), m.group(2).strip()
            if level == 1 and not title and not blocks:
                title = heading  # the page title: every block's context already
                continue
            path = [(lv, h) for lv, h in path if lv < level] + [(level, heading)]
        if body and "\n".join(body).strip():
            blocks.append(Block("\n".join(body).strip(), tuple(h for _, h in path), page))
    return title, blocks


def _read(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {size} bytes, over the {MAX_FILE_BYTES}-byte limit for one document")
    return path.read_bytes()


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _load_html(data: bytes, path: Path) -> tuple[str, list[Block]]:
    try:
        import trafilatura
    except ImportError:
        raise DataError(f"{path}: .html needs trafilatura: pip install 'lmstack[rag]'") from None
    html = _decode(data, path)
    # precision first (short pages, Chinese ones especially, otherwise keep their menus), recall when it finds none
    text = (trafilatura.extract(html, output_format="markdown", include_comments=False, include_tables=True,
                                favor_precision=True)
            or trafilatura.extract(html, output_format="markdown", include_comments=False, include_tables=True,
                                   favor_recall=True))
    if not text:
        raise DataError(f"{path}: no main text found in the HTML")
    meta = trafilatura.extract_metadata(html)
    title, blocks = markdown_blocks(text)
    return (getattr(meta, "title", None) or title or ""), blocks


def _load_pdf(data: bytes, path: Path) -> tuple[str, list[Block]]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise DataError(f"{path}: .pdf needs pypdf: pip install 'lmstack[rag]'") from None
    import logging

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings on damaged files: the reason is reported
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DataError(f"{path}: the PDF is encrypted")
        blocks = []
        for n, page in enumerate(reader.pages, 1):
            text = page.extract_text() or ""
            blocks += [Block(p, (), n) for p in _paragraphs(text)]
        title = str((reader.metadata or {}).get("/Title") or "")
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable PDF ({type(e).__name__}: {e})") from None
    return title, blocks


def _load_docx(data: bytes, path: Path) -> tuple[str, list[Block]]:
    try:
        import docx
    except ImportError:
        raise DataError(f"{path}: .docx needs python-docx: pip install 'lmstack[rag]'") from None
    import zipfile

    try:
        d = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise DataError(f"{path}: not a readable .docx ({type(e).__name__}: {e})") from None
    title, path_, blocks = d.core_properties.title or "", [], []
    for p in d.paragraphs:
        text, style = p.text.strip(), (p.style.name if p.style is not None else "") or ""
        if not text:
            continue
        if style == "Title":
            title = title or text
            continue
        m = re.match(r"Heading (\d)", style)
        if m:
            level = int(m.group(1))
            path_ = [(lv, h) for lv, h in path_ if lv < level] + [(level, text)]
            continue
        blocks.append(Block(text, tuple(h for _, h in path_)))
    return title, blocks


def _load_jsonl(data: bytes, path: Path) -> tuple[str, list[Block]]:
    blocks = []
    for i, line in enumerate(_decode(data, path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{i}: not JSON ({e})") from None
        text = row.get("text", row.get("content")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{i}: expected an object with a 'text' (or 'content') string")
        if text.strip():
            head = row.get("title")
            blocks.append(Block(text.strip(), (str(head),) if head else ()))
    return "", blocks


def _load_csv(data: bytes, path: Path) -> tuple[str, list[Block]]:
    try:
        rows = list(csv.DictReader(io.StringIO(_decode(data, path))))
    except csv.Error as e:
        raise DataError(f"{path}: not CSV ({e})") from None
    blocks = []
    for row in rows:
        text = "; ".join(f"{k}: {v}" for k, v in row.items() if k and v and str(v).strip())
        if text:
            blocks.append(Block(text))
    return "", blocks


def load_file(path: str | Path, source: str | None = None) -> LoadedDoc:
    """One file as a :class:`LoadedDoc` (``source``: the name it is indexed under; default the path)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; supported: {', '.join(SUFFIXES)}")
    data = _read(path)
    if suffix in (".md", ".markdown"):
        title, blocks = markdown_blocks(_decode(data, path))
    elif suffix == ".txt":
        title, blocks = "", [Block(p) for p in _paragraphs(_decode(data, path))]
    elif suffix in (".html", ".htm"):
        title, blocks = _load_html(data, path)
    elif suffix == ".pdf":
        title, blocks = _load_pdf(data, path)
    elif suffix == ".docx":
        title, blocks = _load_docx(data, path)
    elif suffix == ".jsonl":
        title, blocks = _load_jsonl(data, path)
    else:
        title, blocks = _load_csv(data, path)
    return LoadedDoc(source or str(path), title or path.stem, blocks)


def find_files(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """``[(file, source name)]`` for files and directories (searched recursively for :data:`SUFFIXES`), sorted.
    A file under a given directory is named relative to it; a given file by its path as given."""
    out: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in SUFFIXES and not any(
                        part.startswith(".") for part in f.relative_to(p).parts):
                    out[f.relative_to(p).as_posix()] = f
        elif p.is_file():
            out[p.as_posix()] = p
        else:
            raise DataError(f"{p}: no such file or directory")
    return [(f, s) for s, f in sorted(out.items())]
