"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) and write it as a Hugging Face directory.

Sennrich et al. 2016 (BPE for NMT); GPT-2's byte-level variant; the split pattern is in ``pretokenize.py``.

Inputs are files or an iterable of strings, files read by lmstack.data's readers: ``.txt``/``.md`` (one document per file, streamed in
1 MiB pieces cut at line ends), ``.jsonl`` (one JSON object per line, text in ``text_field``), ``.json`` (JSONL,
or one array of records or strings), each optionally ``.gz`` or ``.zst`` compressed, and ``.parquet`` (a string
column ``text_field``). Malformed records and the unreadable rest of a truncated archive are counted and
reported (``ReadStats``), not fatal.
"""

from __future__ import annotations

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


def _base_suffix(path: Path) -> str:
    from lmstack.data.readers import split_ext

    return split_ext(path)[0]


def iter_file_texts(path: Path, text_field: str, stats: ReadStats,
                    advance: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """The texts of one file, read by lmstack.data's readers (formats, compression, binary detection, size caps
    and truncated archives are handled there): a plain-text file is one document in ~1 MiB pieces; every
    problem is counted in ``stats`` with its place. ``advance(n)``: n more bytes of the file read."""
    from lmstack.data.readers import ReadStats as FileStats, iter_file

    fs = FileStats()
    for rec in iter_file(path, path.name, "tokenizer", text_field, fs, txt_mode="chunks",
                         text_ext=frozenset(TEXT_SUFFIXES)):
        stats.chars += len(rec.text)
        yield rec.text
    stats.files += fs.files
    stats.documents += fs.records
    for example in fs.examples:  # "FILE[:LINE]: kind (detail)"
        where, _, reason = example.partition(": ")
        file, _, line = where.rpartition(":")
        if not line.isdigit():
            file, line = where, "0"
        stats.bad(Path(file), int(line), reason)
    for _ in range(sum(fs.problems.values()) - len(fs.examples)):  # past the examples kept: counted only
        stats.bad(path, 0, "more problems of the kinds above")
    try:
        advance(path.stat().st_size)
    except OSError:
        pass


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
                    max_chars: int | None = None, seed: int = 0, split_digits: bool = False) -> Tokenizer:
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
    ``split_digits`` makes every digit its own token (Llama / DeepSeek) instead of groups of 1-3.
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
    backend = build_bpe_tokenizer(specials, split_digits=split_digits)
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
        why = f"; first problem: {stats.malformed[0][0]}:{stats.malformed[0][1]}: {stats.malformed[0][2]}" \
            if stats.malformed else ""
        raise DataError("no text to train on (every record was empty or malformed, or sample_rate kept none)" + why)
    added = {backend.token_to_id(t): t for t in specials}
    config = default_tokenizer_config(specials, chat_template, model_max_length, added)
    tok = Tokenizer(backend, config)
    tok.train_stats = stats
    if out_dir is not None:
        tok.save(out_dir)
    return tok
