"""Streaming document readers: txt, md, jsonl, json, csv, parquet, html; directories and globs; .gz/.zst/.bz2/.xz.

Every reader yields :class:`Record` objects one at a time (constant memory, except ``.json`` arrays and
whole-file txt/html documents, which hold one file). Malformed input never stops a run: bad JSON lines,
missing or non-string text fields, undecodable bytes and empty files are counted in :class:`ReadStats` with
``file:line`` examples. A missing input path stops *before* any work (:func:`expand_inputs`).

Always, whatever the later filters: a file whose first 8 KiB hold a NUL byte or mostly control characters
is ``binary_file`` (not text, whatever its name); a record (line, field, whole file) over
``max_record_bytes`` is skipped as ``record_too_large`` without being read into memory whole; a directory or
file that cannot be read is ``unreadable_path`` / ``unreadable_file`` -- counted and reported, and fatal when
``ReadStats.strict`` (``lmstack data run --strict``).
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import json
import lzma
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lmstack.errors import DataError
from lmstack.utils.io import looks_binary

TEXT_EXT = {".txt", ".md", ".markdown", ".text"}
HTML_EXT = {".html", ".htm", ".xhtml"}
JSONL_EXT = {".jsonl", ".ndjson"}
SUPPORTED = TEXT_EXT | HTML_EXT | JSONL_EXT | {".json", ".csv", ".tsv", ".parquet"}
COMPRESSED = {".gz", ".zst", ".zstd", ".bz2", ".xz"}
MAX_EXAMPLES = 20
MAX_RECORD_BYTES = 8 << 20  # 8 MiB of text per document; larger ones are skipped (record_too_large)
MAX_JSON_ARRAY_BYTES = 1 << 30  # a .json file is parsed whole; larger: convert it to JSON Lines
CHUNK_BYTES = 1 << 20  # txt_mode "chunks": pieces of a text document
BINARY_SAMPLE = 8192
UNREADABLE = ("unreadable_path", "unreadable_file")


@dataclass
class Record:
    text: str
    id: str          # "<source>/<relative path>:<line or row>" -- stable across runs and shards
    source: str      # the input's name (for mixing and provenance)
    path: str        # the file it came from
    line: int        # 1-based line (jsonl/txt lines), row (csv/parquet/json array), 0 for a whole file
    html: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadStats:
    files: int = 0
    records: int = 0
    bytes: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    strict: bool = False  # an unreadable path raises DataError instead of being counted

    def bad(self, kind: str, where: str, detail: str = "") -> None:
        if self.strict and kind in UNREADABLE:
            raise DataError(f"{where}: cannot read it ({detail}); fix its permissions or remove it from the inputs "
                            "(without --strict it is skipped and counted in the report)")
        self.problems[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {kind}" + (f" ({detail})" if detail else ""))

    def merge(self, other: "ReadStats") -> None:
        self.files += other.files
        self.records += other.records
        self.bytes += other.bytes
        self.problems.update(other.problems)
        self.examples.extend(other.examples[: max(0, MAX_EXAMPLES - len(self.examples))])

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "records": self.records, "bytes": self.bytes,
                "problems": dict(self.problems), "examples": self.examples}


def split_ext(path: Path) -> tuple[str, str | None]:
    """(format extension, compression extension or None): ``a.jsonl.gz`` -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else None
    rest = suffixes[:-1] if comp else suffixes
    return (rest[-1] if rest else ""), comp


class _ZstdStream(io.RawIOBase):
    """Zstandard decompression that, unlike ``stream_reader``, raises EOFError on a truncated frame
    (multi-frame files, as written by ``zstd`` in chunks, are supported)."""

    def __init__(self, raw):
        import zstandard

        self.raw = raw
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.buf = b""
        self.started = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.started and not self.obj.eof:
                    raise EOFError("zstd data ended before the end of its frame (truncated file?)")
                return 0
            self.started = True
            out = b""
            while chunk:
                if self.obj.eof:  # next frame
                    self.obj = self.dctx.decompressobj()
                out += self.obj.decompress(chunk)
                chunk = self.obj.unused_data if self.obj.eof else b""
            self.buf = out
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open a possibly compressed file as a binary stream (streaming decompression; a truncated .gz / .zst
    raises EOFError at its end instead of ending quietly)."""
    _, comp = split_ext(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp in (".zst", ".zstd"):
        return io.BufferedReader(_ZstdStream(open(path, "rb")))
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    base = []
    for p in parts:
        if glob.has_magic(p):
            break
        base.append(p)
    return Path(*base) if base else Path(".")


def expand_inputs(pattern: str | os.PathLike, where: str = "inputs") -> list[tuple[Path, str]]:
    """Files for one input spec (file, directory, or glob), sorted, as (path, relative name).

    Raises DataError when nothing matches (before any work starts)."""
    spec = str(pattern)
    p = Path(spec).expanduser()
    if glob.has_magic(spec):
        base = _glob_base(spec)
        files = sorted(Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file())
        if not files:
            raise DataError(f"{where}: {spec!r} matches no files; check the path and the glob pattern")
        return [(f, str(f.relative_to(base)) if f.is_relative_to(base) else f.name) for f in files]
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise DataError(f"{where}: directory {spec} cannot be read (permission denied); fix its permissions")
        files, unreadable = _walk(p)
        if not files and not unreadable:
            raise DataError(f"{where}: directory {spec} has no supported files ({', '.join(sorted(SUPPORTED))})")
        if not files and len(unreadable) == 1 and unreadable[0] == p:
            raise DataError(f"{where}: directory {spec} cannot be read; fix its permissions")
        # unreadable subdirectories stay in the list: the reader counts each as unreadable_path
        return sorted(((f, str(f.relative_to(p))) for f in files + unreadable), key=lambda x: str(x[0]))
    if p.is_file():
        return [(p, p.name)]
    raise DataError(f"{where}: input path {spec} does not exist")


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(supported files, directories that could not be listed) under ``root``; hidden entries skipped."""
    files: list[Path] = []
    unreadable: list[Path] = []

    def onerror(e: OSError) -> None:
        unreadable.append(Path(e.filename) if e.filename else root)

    for d, dirs, names in os.walk(root, onerror=onerror):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for n in names:
            f = Path(d) / n
            if not n.startswith(".") and split_ext(f)[0] in SUPPORTED and f.is_file():
                files.append(f)
    return files, unreadable


def _peek(fh: Any, n: int = BINARY_SAMPLE) -> bytes:
    try:
        return bytes(fh.peek(n)[:n])
    except (AttributeError, OSError, EOFError, ValueError):
        return b""


def _read_capped(fh: Any, cap: int) -> bytes | None:
    """The rest of ``fh``, or None (after draining nothing more) when it exceeds ``cap`` bytes."""
    raw = fh.read(cap + 1)
    return None if len(raw) > cap else raw


def _lines_capped(fh: Any, cap: int) -> Iterator[bytes | None]:
    """Lines of ``fh``; a line over ``cap`` bytes yields None and is skipped in chunks (never held whole)."""
    while True:
        raw = fh.readline(cap + 1)
        if not raw:
            return
        if len(raw) > cap and not raw.endswith(b"\n"):
            while True:
                rest = fh.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield raw


def _decode(raw: bytes, stats: ReadStats, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.bad("undecodable_bytes", where, f"byte {e.start}; replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


def _field(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def iter_file(path: Path, rel: str, source: str, text_field: str, stats: ReadStats,
              txt_mode: str = "file", keep_fields: tuple[str, ...] = (),
              max_record_bytes: int = MAX_RECORD_BYTES, text_ext: frozenset[str] = frozenset()) -> Iterator[Record]:
    """Yield the records of one file; problems go to ``stats``. ``txt_mode="chunks"``: a text file is one document
    of any size, yielded in ~1 MiB pieces cut at line ends (what tokenizer training reads); ``text_ext``: more
    suffixes read as plain text (source code: ``.py``, ``.c`` ...)."""
    if path.is_dir():  # a subdirectory the walk could not list
        stats.bad("unreadable_path", str(path), "directory cannot be listed")
        return
    fmt, _ = split_ext(path)
    stats.files += 1
    name = f"{source}/{rel}"
    is_text = fmt in TEXT_EXT or fmt in text_ext
    if fmt not in SUPPORTED and not is_text:
        stats.bad("unsupported_file", str(path), f"extension {fmt or '(none)'}")
        return
    try:
        fh = open_binary(path)
    except OSError as e:
        stats.bad("unreadable_file", str(path), e.strerror or str(e))
        return
    n_before, p_before = stats.records, sum(stats.problems.values())
    cap = max_record_bytes
    try:
        with fh:
            if fmt != ".parquet" and looks_binary(_peek(fh)):
                stats.bad("binary_file", str(path), "NUL bytes or control characters: not text")
                return
            if is_text and txt_mode == "chunks":
                buf, size, start, lineno = [], 0, 1, 0
                for lineno, raw in enumerate(_lines_capped(fh, cap), 1):
                    if raw is None:
                        stats.bad("record_too_large", f"{path}:{lineno}", f"line over {cap:,} bytes; skipped")
                        continue
                    buf.append(raw)
                    size += len(raw)
                    if size >= CHUNK_BYTES:
                        stats.bytes += size
                        yield Record(_decode(b"".join(buf), stats, str(path)), f"{name}:{start}", source, str(path), start)
                        buf, size, start = [], 0, lineno + 1
                if buf:
                    stats.bytes += size
                    yield Record(_decode(b"".join(buf), stats, str(path)), f"{name}:{start}", source, str(path), start)
                stats.records += 1  # one document, however many pieces
            elif fmt in JSONL_EXT or (is_text and txt_mode == "line"):
                for lineno, raw in enumerate(_lines_capped(fh, cap), 1):
                    where = f"{path}:{lineno}"
                    if raw is None:
                        stats.bad("record_too_large", where, f"line over {cap:,} bytes; skipped")
                        continue
                    stats.bytes += len(raw)
                    line = _decode(raw, stats, where).strip()
                    if not line:
                        continue
                    if fmt in TEXT_EXT:
                        stats.records += 1
                        yield Record(line, f"{name}:{lineno}", source, str(path), lineno)
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        stats.bad("malformed_json", where, e.msg)
                        continue
                    rec = _record_from_obj(obj, text_field, stats, where, f"{name}:{lineno}", source, path, lineno,
                                           keep_fields, cap)
                    if rec is not None:
                        yield rec
            elif fmt == ".json":
                raw = _read_capped(fh, MAX_JSON_ARRAY_BYTES)
                if raw is None:
                    stats.bad("record_too_large", str(path), f".json file over {MAX_JSON_ARRAY_BYTES:,} bytes is "
                              "parsed whole; convert it to JSON Lines")
                    return
                stats.bytes += len(raw)
                try:
                    data = json.loads(_decode(raw, stats, str(path)))
                except json.JSONDecodeError as e:
                    stats.bad("malformed_json", f"{path}:{e.lineno}", e.msg)
                    return
                items = data if isinstance(data, list) else [data]
                for row, obj in enumerate(items, 1):
                    rec = _record_from_obj(obj, text_field, stats, f"{path}[{row}]", f"{name}:{row}", source, path,
                                           row, keep_fields, cap)
                    if rec is not None:
                        yield rec
            elif fmt in (".csv", ".tsv"):
                csv.field_size_limit(min(cap, sys.maxsize))
                text = io.TextIOWrapper(fh, encoding="utf-8", errors="replace", newline="")
                reader = csv.DictReader(text, delimiter="\t" if fmt == ".tsv" else ",")
                if reader.fieldnames is not None and text_field not in reader.fieldnames:
                    stats.bad("missing_field", f"{path}:1", f"no column {text_field!r}; columns: {reader.fieldnames}")
                    return
                for row, obj in enumerate(reader, 1):
                    rec = _record_from_obj(obj, text_field, stats, f"{path}:{row + 1}", f"{name}:{row}", source,
                                           path, row, keep_fields, cap)
                    if rec is not None:
                        yield rec
            elif fmt == ".parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(fh)
                cols = [text_field.split(".")[0], *[k for k in keep_fields if k in pf.schema_arrow.names]]
                if text_field.split(".")[0] not in pf.schema_arrow.names:
                    stats.bad("missing_field", str(path), f"no column {text_field!r}; columns: {pf.schema_arrow.names}")
                    return
                row = 0
                for batch in pf.iter_batches(columns=list(dict.fromkeys(cols)), batch_size=1024):
                    for obj in batch.to_pylist():
                        row += 1
                        rec = _record_from_obj(obj, text_field, stats, f"{path}[row {row}]", f"{name}:{row}", source,
                                               path, row, keep_fields, cap)
                        if rec is not None:
                            yield rec
            else:  # whole-file text / markdown / html document, or txt paragraphs
                raw = _read_capped(fh, cap if txt_mode != "paragraph" else MAX_JSON_ARRAY_BYTES)
                if raw is None:
                    stats.bad("record_too_large", str(path), f"document over {cap:,} bytes; skipped")
                    return
                stats.bytes += len(raw)
                text = _decode(raw, stats, str(path))
                if is_text and txt_mode == "paragraph":
                    para, lineno, start = [], 0, 1
                    for lineno, line in enumerate(text.split("\n"), 1):
                        if line.strip():
                            if not para:
                                start = lineno
                            para.append(line)
                        elif para:
                            stats.records += 1
                            yield Record("\n".join(para), f"{name}:{start}", source, str(path), start)
                            para = []
                    if para:
                        stats.records += 1
                        yield Record("\n".join(para), f"{name}:{start}", source, str(path), start)
                elif text.strip():
                    stats.records += 1
                    yield Record(text, f"{name}:0", source, str(path), 0, html=fmt in HTML_EXT)
    except csv.Error as e:  # a field over the cap
        stats.bad("record_too_large", str(path), f"csv: {e}")
    except (OSError, EOFError, ValueError) as e:  # truncated gzip/zstd, corrupt parquet
        stats.bad("corrupt_file", str(path), f"{type(e).__name__}: {e}")
    if stats.records == n_before and sum(stats.problems.values()) == p_before:
        stats.bad("empty_file", str(path), "no documents")


def _record_from_obj(obj: Any, text_field: str, stats: ReadStats, where: str, rid: str, source: str, path: Path,
                     line: int, keep_fields: tuple[str, ...], cap: int = MAX_RECORD_BYTES) -> Record | None:
    if isinstance(obj, str):  # a JSON array of strings: each string is a document
        obj = {text_field: obj}
    if not isinstance(obj, dict):
        stats.bad("not_an_object", where, type(obj).__name__)
        return None
    text = _field(obj, text_field)
    if text is None:
        stats.bad("missing_field", where, f"no field {text_field!r}")
        return None
    if not isinstance(text, str):
        stats.bad("non_string_field", where, f"{text_field!r} is {type(text).__name__}")
        return None
    if not text.strip():
        stats.bad("empty_text", where)
        return None
    if len(text) > cap // 4 and len(text.encode("utf-8")) > cap:
        stats.bad("record_too_large", where, f"{text_field!r} over {cap:,} bytes; skipped")
        return None
    stats.records += 1
    meta = {k: obj[k] for k in keep_fields if k in obj}
    return Record(text, rid, source, str(path), line, meta=meta)
