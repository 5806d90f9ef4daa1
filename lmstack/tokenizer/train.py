"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) and write it as a Hugging Face directory.

Sennrich et al. 2016 (BPE for NMT); GPT-2's byte-level variant; the split pattern is in ``pretokenize.py``.

Inputs are files or an iterable of strings. Files: ``.txt``/``.md`` (one document per file, streamed in
1 MiB pieces cut at line ends), ``.jsonl`` (one JSON object per line, text in ``text_field``), ``.json`` (JSONL,
or one array of records or strings), each optionally ``.gz`` or ``.zst`` compressed, and ``.parquet`` (a string
column ``text_field``). Malformed records and the unreadable rest of a truncated archive are counted and
reported (``ReadStats``), not fatal.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from lmstack.errors import DataError, LmstackError
from lmstack.tokenizer.pretokenize import DEFAULT_SPECIAL_TOKENS, EOS, IM_END, IM_START, PAD, build_bpe_tokenizer
from lmstack.tokenizer.templates import CHATML_TEMPLATE
from lmstack.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".py", ".c", ".js", ".html"}
_CHUNK = 1 << 20  # 1 MiB pieces of plain-text files


@dataclass
class ReadStats:
    """What the reader saw; ``malformed`` lists (file, line, reason) for the first 20 bad records."""

    files: int = 0
    documents: int = 0
    chars: int = 0
    bad_records: int = 0
    trained_chars: int = 0  # after sample_rate / max_chars
    malformed: list[tuple[str, int, str]] = field(default_factory=list)

    def bad(self, path: Path, line: int, reason: str) -> None:
        self.bad_records += 1
        if len(self.malformed) < 20:
            self.malformed.append((str(path), line, reason))


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


class _Reader:
    """Binary line reader over a plain, .gz or .zst file; ``pos`` = bytes of the file on disk consumed so far."""

    def __init__(self, path: Path):
        self.raw = open(path, "rb")
        name = path.name.lower()
        if name.endswith(".gz"):
            self.f = gzip.GzipFile(fileobj=self.raw)
        elif name.endswith(".zst"):
            self.f = io.BufferedReader(_ZstdStream(self.raw))
        else:
            self.f = self.raw

    @property
    def pos(self) -> int:
        return self.raw.tell()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.f)

    def close(self) -> None:
        if self.f is not self.raw:
            self.f.close()
        self.raw.close()


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def iter_file_texts(path: Path, text_field: str, stats: ReadStats,
                    advance: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """Yield the text of one file (see module docstring for formats); ``advance(n)``: n more bytes on disk read."""
    suffix = _base_suffix(path)
    stats.files += 1
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                            "pass --text-field")
        for g in range(pf.num_row_groups):
            for t in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
                if isinstance(t, str):
                    stats.documents += 1
                    stats.chars += len(t)
                    yield t
            advance(pf.metadata.row_group(g).total_byte_size)
        return
    reader = _Reader(path)
    done = 0

    def tick() -> None:
        nonlocal done
        pos = reader.pos
        if pos - done >= _CHUNK:
            advance(pos - done)
            done = pos

    lineno = 0
    try:
        from lmstack.utils.io import looks_binary  # lazily: lmstack.utils loads rich

        head = reader.f.peek(8192)[:8192] if hasattr(reader.f, "peek") else b""
        if looks_binary(head):  # an image or executable named .txt is not training text
            stats.bad(path, 0, "binary file (NUL bytes or control characters); skipped")
            return
        if suffix == ".json" and _starts_with(reader, b"["):  # one JSON array of records (or strings)
            yield from _json_array(path, b"".join(reader), text_field, stats)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            for lineno, raw in enumerate(reader, 1):
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    stats.bad(path, lineno, f"invalid JSON ({e.msg})")
                    continue
                t = rec.get(text_field) if isinstance(rec, dict) else None
                if not isinstance(t, str):
                    stats.bad(path, lineno, f"no string field {text_field!r}")
                    continue
                stats.documents += 1
                stats.chars += len(t)
                yield t
                tick()
        else:  # plain text: one document, streamed in ~1 MiB pieces cut at line ends
            stats.documents += 1
            buf: list[bytes] = []
            size = 0
            for raw in reader:
                buf.append(raw)
                size += len(raw)
                if size >= _CHUNK:
                    text = b"".join(buf).decode("utf-8", errors="replace")
                    stats.chars += len(text)
                    yield text
                    buf, size = [], 0
                    tick()
            if buf:
                text = b"".join(buf).decode("utf-8", errors="replace")
                stats.chars += len(text)
                yield text
        advance(reader.pos - done)
    except _read_errors() as e:  # truncated .gz/.zst, bad compressed data: count it, skip the rest of the file
        stats.bad(path, lineno, f"unreadable after this point ({type(e).__name__}: {e})")
        log.warning("%s: unreadable after line %d (%s); skipping the rest of the file", path, lineno, e)
    finally:
        reader.close()


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover
        pass
    return errors


def _starts_with(reader: "_Reader", prefix: bytes) -> bool:
    """Whether the file's first non-whitespace bytes are ``prefix`` (the reader is rewound)."""
    head = reader.f.peek(64) if hasattr(reader.f, "peek") else b""
    return head.lstrip()[: len(prefix)] == prefix


def _json_array(path: Path, data: bytes, text_field: str, stats: ReadStats) -> Iterator[str]:
    try:
        items = json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        stats.bad(path, e.lineno, f"invalid JSON ({e.msg})")
        return
    for i, rec in enumerate(items):
        t = rec if isinstance(rec, str) else rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(t, str):
            stats.bad(path, i + 1, f"item {i} has no string field {text_field!r}")
            continue
        stats.documents += 1
        stats.chars += len(t)
        yield t


TRAIN_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".json", ".ndjson", ".parquet"}


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files and directories -> files. A directory contributes its text files (by suffix, recursively, sorted);
    a file named explicitly is read whatever its suffix. Missing paths raise one clear error."""
    files: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")
                                and _base_suffix(q) in TRAIN_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist")
    if not files:
        raise DataError(f"no input files in {', '.join(map(str, inputs))} "
                        f"(directories are searched for {' '.join(sorted(TRAIN_SUFFIXES))}, optionally .gz/.zst)")
    return files


def _looks_like_path(x: str) -> bool:
    return 0 < len(x) < 4096 and not any(c in x for c in "\n\t ")


def iter_texts(inputs, text_field: str = "text", stats: ReadStats | None = None,
               show_progress: bool = True) -> Iterator[str]:
    """Texts of ``inputs``: file/dir paths (formats in the module docstring) or an iterable of strings."""
    stats = stats if stats is not None else ReadStats()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs) if not isinstance(inputs, Iterator) else inputs
    is_paths = isinstance(inputs, list) and inputs and all(isinstance(x, os.PathLike) for x in inputs)
    if isinstance(inputs, list) and not is_paths and inputs and all(isinstance(x, str) for x in inputs):
        # A list of strings is a list of paths when all look like paths (no whitespace) and one exists or all
        # have a "/" or a suffix; then a missing one is an error, not a tiny training text.
        is_paths = all(_looks_like_path(x) for x in inputs) and (
            any(Path(x).exists() for x in inputs) or all("/" in x or os.sep in x or Path(x).suffix for x in inputs))
    if not is_paths:
        for t in inputs:
            if not isinstance(t, str):
                raise LmstackError(f"train_tokenizer: expected strings or file paths, got {type(t).__name__}")
            stats.documents += 1
            stats.chars += len(t)
            yield t
        return
    files = expand_inputs(inputs)
    from lmstack.utils.progress import progress

    total = sum(f.stat().st_size for f in files)
    with progress(disable=None if show_progress else True) as bar:
        task = bar.add_task(f"reading {len(files)} files (KiB)", total=max(total // 1024, 1))
        for path in files:
            yield from iter_file_texts(path, text_field, stats, lambda n: bar.advance(task, n / 1024))


def _sample(texts: Iterator[str], rate: float, max_chars: int | None, seed: int, stats: ReadStats) -> Iterator[str]:
    """Keep each text (document, or 1 MiB piece of a plain-text file) with probability ``rate``; stop after
    ``max_chars`` characters."""
    import random

    rng = random.Random(seed)
    for t in texts:
        if rate < 1.0 and rng.random() >= rate:
            continue
        if max_chars is not None and stats.trained_chars + len(t) > max_chars:
            rest = max_chars - stats.trained_chars
            if rest > 0:
                stats.trained_chars += rest
                yield t[:rest]
            return
        stats.trained_chars += len(t)
        yield t


def default_tokenizer_config(special_tokens: Sequence[str], chat_template: str | None, model_max_length: int,
                             added: dict[int, str]) -> dict:
    """The ``tokenizer_config.json`` lmstack writes (loads in ``transformers.AutoTokenizer``)."""
    named = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
    for k in ("bos_token", "eos_token", "pad_token"):
        if named[k] not in special_tokens:
            named[k] = None
    extra = [t for t in special_tokens if t not in named.values()]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **named,
        "additional_special_tokens": [t for t in (IM_START, IM_END) if t in extra] or extra[:2],
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in sorted(added.items())},
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg


MAX_VOCAB = 1 << 21  # 2,097,152: 8x the largest released vocabularies (~256k)


def train_tokenizer(inputs: Iterable[str] | Sequence[str | os.PathLike], vocab_size: int,
                    out_dir: str | os.PathLike | None = None, special_tokens: Sequence[str] | None = None,
                    min_frequency: int = 2, text_field: str = "text", chat_template: str | None = CHATML_TEMPLATE,
                    model_max_length: int = 32768, show_progress: bool = True, sample_rate: float = 1.0,
                    max_chars: int | None = None, seed: int = 0) -> Tokenizer:
    """Train byte-level BPE on ``inputs`` (file/dir paths or an iterable of strings).

    A list of ``str`` is read as paths when every item looks like a path (no whitespace) and one exists or all
    contain "/" or a suffix; pass ``pathlib.Path`` objects (always paths) or an iterator (always texts) to be
    explicit.

    ``vocab_size`` counts everything: 256 byte tokens + special tokens + merges. ``special_tokens`` default:
    ``<|endoftext|>`` (document separator, bos/eos), ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>`` and 8
    ``<|reserved_i|>``; they get ids 0.. in that order. Writes ``tokenizer.json`` + ``tokenizer_config.json``
    to ``out_dir`` when given. Returns the trained :class:`Tokenizer`.

    For corpora larger than memory allows, ``sample_rate`` keeps each document (or 1 MiB piece of a plain-text
    file) with that probability (seeded), and ``max_chars`` stops reading after that many characters.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise LmstackError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if max_chars is not None and max_chars <= 0:
        raise LmstackError(f"max_chars must be positive, got {max_chars}")
    from tokenizers import pre_tokenizers, trainers

    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials):
        raise LmstackError(f"special_tokens has duplicates: {specials}")
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise LmstackError(f"vocab_size {vocab_size} is too small: 256 byte tokens + {len(specials)} special "
                           f"tokens need at least {floor}; use e.g. --vocab-size 32000")
    if vocab_size > MAX_VOCAB:
        raise LmstackError(f"vocab_size {vocab_size} is too large: the BPE trainer preallocates per token (10^9 "
                           f"needs ~70 GB) and token ids must fit the shards' uint32; use at most {MAX_VOCAB:,} "
                           "(e.g. --vocab-size 32000)")
    backend = build_bpe_tokenizer(specials)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress and not os.environ.get("LMSTACK_NO_PROGRESS") and sys.stderr.isatty(),
    )
    stats = ReadStats()
    texts = _sample(iter_texts(inputs, text_field, stats, show_progress), sample_rate, max_chars, seed, stats)
    backend.train_from_iterator(texts, trainer=trainer)
    if stats.bad_records:
        first = "; ".join(f"{f}:{n}: {r}" for f, n, r in stats.malformed[:3])
        log.warning("skipped %d malformed records (%s)", stats.bad_records, first)
    if stats.documents == 0 or stats.trained_chars == 0:
        raise DataError("no text to train on (every record was empty or malformed, or sample_rate kept none)")
    added = {backend.token_to_id(t): t for t in specials}
    config = default_tokenizer_config(specials, chat_template, model_max_length, added)
    tok = Tokenizer(backend, config)
    tok.train_stats = stats
    if out_dir is not None:
        tok.save(out_dir)
    return tok
