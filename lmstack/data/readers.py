"""Streaming document readers: txt, md, jsonl, json, csv, parquet, html; directories and globs; .gz/.zst/.bz2/.xz.

Every reader yields :class:`Record` objects one at a time (constant memory, except ``.json`` arrays and
whole-file txt/html documents, which hold one file). Malformed input never stops a run: bad JSON lines,
missing or non-string text fields, undecodable bytes and empty files are counted in :class:`ReadStats` with
``file:line`` examples. A missing input path stops *before* any work (:func:`expand_inputs`).
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

TEXT_EXT = {".txt", ".md", ".markdown", ".text"}
HTML_EXT = {".html", ".htm", ".xhtml"}
JSONL_EXT = {".jsonl", ".ndjson"}
SUPPORTED = TEXT_EXT | HTML_EXT | JSONL_EXT | {".json", ".csv", ".tsv", ".parquet"}
COMPRESSED = {".gz", ".zst", ".zstd", ".bz2", ".xz"}
MAX_EXAMPLES = 20


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

    def bad(self, kind: str, where: str, detail: str = "") -> None:
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


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open a possibly compressed file as a binary stream (streaming decompression)."""
    _, comp = split_ext(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp in (".zst", ".zstd"):
        import zstandard

        fh = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
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
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and split_ext(f)[0] in SUPPORTED)
        if not files:
            raise DataError(f"{where}: directory {spec} has no supported files ({', '.join(sorted(SUPPORTED))})")
        return [(f, str(f.relative_to(p))) for f in files]
    if p.is_file():
        return [(p, p.name)]
    raise DataError(f"{where}: input path {spec} does not exist")


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
              txt_mode: str = "file", keep_fields: tuple[str, ...] = ()) -> Iterator[Record]:
    """Yield the records of one file; problems go to ``stats``."""
    fmt, _ = split_ext(path)
    stats.files += 1
    name = f"{source}/{rel}"
    if fmt not in SUPPORTED:
        stats.bad("unsupported_file", str(path), f"extension {fmt or '(none)'}")
        return
    try:
        fh = open_binary(path)
    except OSError as e:
        stats.bad("unreadable_file", str(path), str(e))
        return
    n_before, p_before = stats.records, sum(stats.problems.values())
    try:
        with fh:
            if fmt in JSONL_EXT or (fmt in TEXT_EXT and txt_mode == "line"):
                for lineno, raw in enumerate(fh, 1):
                    stats.bytes += len(raw)
                    where = f"{path}:{lineno}"
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
                                           keep_fields)
                    if rec is not None:
                        yield rec
            elif fmt == ".json":
                raw = fh.read()
                stats.bytes += len(raw)
                try:
                    data = json.loads(_decode(raw, stats, str(path)))
                except json.JSONDecodeError as e:
                    stats.bad("malformed_json", f"{path}:{e.lineno}", e.msg)
                    return
                items = data if isinstance(data, list) else [data]
                for row, obj in enumerate(items, 1):
                    rec = _record_from_obj(obj, text_field, stats, f"{path}[{row}]", f"{name}:{row}", source, path,
                                           row, keep_fields)
                    if rec is not None:
                        yield rec
            elif fmt in (".csv", ".tsv"):
                csv.field_size_limit(sys.maxsize)
                text = io.TextIOWrapper(fh, encoding="utf-8", errors="replace", newline="")
                reader = csv.DictReader(text, delimiter="\t" if fmt == ".tsv" else ",")
                if reader.fieldnames is not None and text_field not in reader.fieldnames:
                    stats.bad("missing_field", f"{path}:1", f"no column {text_field!r}; columns: {reader.fieldnames}")
                    return
                for row, obj in enumerate(reader, 1):
                    rec = _record_from_obj(obj, text_field, stats, f"{path}:{row + 1}", f"{name}:{row}", source,
                                           path, row, keep_fields)
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
                                               path, row, keep_fields)
                        if rec is not None:
                            yield rec
            else:  # whole-file text / markdown / html document, or txt paragraphs
                raw = fh.read()
                stats.bytes += len(raw)
                text = _decode(raw, stats, str(path))
                if fmt in TEXT_EXT and txt_mode == "paragraph":
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
    except (OSError, EOFError, ValueError) as e:  # truncated gzip/zstd, corrupt parquet
        stats.bad("corrupt_file", str(path), f"{type(e).__name__}: {e}")
    if stats.records == n_before and sum(stats.problems.values()) == p_before:
        stats.bad("empty_file", str(path), "no documents")


def _record_from_obj(obj: Any, text_field: str, stats: ReadStats, where: str, rid: str, source: str, path: Path,
                     line: int, keep_fields: tuple[str, ...]) -> Record | None:
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
    stats.records += 1
    meta = {k: obj[k] for k in keep_fields if k in obj}
    return Record(text, rid, source, str(path), line, meta=meta)
