"""Token shards: the nanoGPT ``.bin`` format, sharded, with a JSON index (``lmstack-shards-v1``).

Layout of an output directory::

    index.json          format, dtype, vocab_size, eos_token_id, tokenizer_sha256, splits, sources
    train_00000.bin     flat little-endian uint16 (vocab_size <= 65536) or uint32 token ids
    train_00001.bin     ... each document's tokens followed by EOS; a document never straddles two files
    val_00000.bin

The validation split is by document and deterministic from ``seed``: with ``val_fraction`` each document
goes to val when a seeded hash of its position falls under the fraction; with ``val_documents=k`` a seeded
reservoir sample of exactly k documents (or all but one if fewer) goes to val. Documents never split.

Reference: nanoGPT ``data/openwebtext/prepare.py`` (uint16 memmap of ids with EOT between documents).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lmstack._version import __version__
from lmstack.errors import DataError
from lmstack.utils.io import atomic_dir, atomic_write_json, read_json

FORMAT = "lmstack-shards-v1"
DEFAULT_SHARD_TOKENS = 100_000_000


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _in_val(i: int, seed: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class _SplitWriter:
    """Appends documents to ``<split>_NNNNN.bin`` files, rolling over at ``shard_tokens`` (document-aligned)."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.files: list[dict[str, Any]] = []
        self._f = None

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.files):05d}.bin"
        self._f = open(self.root / name, "wb")
        self.files.append({"path": name, "tokens": 0, "documents": 0})

    def add(self, ids: np.ndarray) -> None:  # ids: (n_tokens + 1,) including the trailing EOS
        cur = self.files[-1] if self.files else None
        if cur is None or (cur["tokens"] > 0 and cur["tokens"] + len(ids) > self.shard_tokens):
            self._open_next()
            cur = self.files[-1]
        self._f.write(ids.astype(self.dtype, copy=False).tobytes())
        cur["tokens"] += int(len(ids))
        cur["documents"] += 1

    def close(self) -> dict[str, Any]:
        if self._f is not None:
            self._f.close()
        return {"files": self.files, "tokens": sum(f["tokens"] for f in self.files),
                "documents": sum(f["documents"] for f in self.files)}


def write_shards(texts: Iterable[str], tokenizer, out_dir: str | os.PathLike, *, val_fraction: float | None = 0.01,
                 val_documents: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0,
                 batch_size: int = 256, sources: Sequence[dict] | Callable[[], list] | None = None, tokenizer_dir: str | None = None,
                 progress_total: int | None = None) -> dict[str, Any]:
    """Tokenize ``texts`` (each one document), append EOS after each, write train/val shards and ``index.json``.

    ``tokenizer`` needs ``encode_batch(texts) -> list[list[int]]``, ``eos_token_id``, ``vocab_size`` and
    ``sha256`` (the :class:`lmstack.tokenizer.Tokenizer` contract). The directory is written atomically.
    ``sources`` (provenance for the index) may be a callable, evaluated after the last document was read.
    Returns the index dict."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; set one in tokenizer_config.json before writing shards")
    if val_documents is not None and val_documents < 0:
        raise DataError(f"val_documents must be >= 0, got {val_documents}")
    if val_documents is None and not (0.0 <= (val_fraction or 0.0) < 1.0):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    vocab = int(tokenizer.vocab_size)
    dtype = shard_dtype(vocab)
    eos_arr = np.array([eos], dtype=np.int64)
    rng = random.Random(seed)
    from lmstack.utils.progress import progress

    with atomic_dir(out_dir) as tmp, progress() as bar:
        task = bar.add_task("tokenize", total=progress_total)
        train = _SplitWriter(tmp, "train", dtype, shard_tokens)
        val = _SplitWriter(tmp, "val", dtype, shard_tokens)
        reservoir: list[np.ndarray] = []  # val_documents mode: seeded reservoir sample
        held: tuple[np.ndarray, bool] | None = None  # val_fraction mode: last doc held back (val never empty)
        frac = val_fraction or 0.0
        seen = 0
        batch: list[str] = []

        def route(doc: np.ndarray, i: int) -> None:  # doc: (n_tokens + 1,) int64
            nonlocal held
            if val_documents is None:
                if held is not None:
                    (val if held[1] else train).add(held[0])
                held = (doc, _in_val(i, seed, frac))
            elif len(reservoir) < val_documents:
                reservoir.append(doc)
            else:
                j = rng.randrange(i + 1)
                if j < val_documents:
                    train.add(reservoir[j])
                    reservoir[j] = doc
                else:
                    train.add(doc)

        def flush() -> None:
            nonlocal seen
            if not batch:
                return
            for ids in tokenizer.encode_batch(batch):
                arr = np.concatenate([np.asarray(ids, dtype=np.int64), eos_arr])
                if arr.max() >= vocab or arr.min() < 0:
                    raise DataError(f"token id {int(arr.max())} out of range for vocab_size {vocab}")
                route(arr, seen)
                seen += 1
            bar.advance(task, len(batch))
            batch.clear()

        for t in texts:
            batch.append(t)
            if len(batch) >= batch_size:
                flush()
        flush()
        if val_documents is not None:
            if reservoir and not train.files and len(reservoir) > 1:
                train.add(reservoir.pop())  # keep at least one training document
            for doc in reservoir:
                val.add(doc)
        elif held is not None:
            force_val = not val.files and seen >= 2 and frac > 0
            (val if train.files and (held[1] or force_val) else train).add(held[0])
        if seen == 0:
            raise DataError("no documents to tokenize (all inputs empty or filtered out)")
        index = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eos_token_id": int(eos),
            "tokenizer_sha256": getattr(tokenizer, "sha256", None),
            # relative to this directory, so the shards find their tokenizer from any working directory
            "tokenizer_dir": (os.path.relpath(os.path.abspath(tokenizer_dir), os.path.abspath(out_dir))
                              if tokenizer_dir else None),
            "splits": {"train": train.close(), "val": val.close()},
            "sources": sources() if callable(sources) else list(sources or []),
            "created_by": f"lmstack {__version__}",
        }
        atomic_write_json(tmp / "index.json", index)
    return index


def read_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``index.json`` of a shard directory."""
    path = Path(out_dir) / "index.json"
    if not path.is_file():
        raise DataError(f"{out_dir}: no index.json; write shards with `lmstack data tokenize` first")
    index = read_json(path)
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r} is not {FORMAT!r}")
    return index


def open_split(out_dir: str | os.PathLike, split: str = "train") -> list[np.memmap]:
    """The split's shard files as read-only ``np.memmap`` arrays (one per file, in order)."""
    index = read_index(out_dir)
    if split not in index["splits"]:
        raise DataError(f"{out_dir}: no split {split!r}; have {sorted(index['splits'])}")
    dtype = np.dtype(index["dtype"])
    out = []
    for f in index["splits"][split]["files"]:
        p = Path(out_dir) / f["path"]
        if not p.is_file():
            raise DataError(f"{p}: shard listed in index.json is missing")
        if p.stat().st_size != f["tokens"] * dtype.itemsize:
            raise DataError(f"{p}: size {p.stat().st_size} bytes does not match {f['tokens']} {dtype.name} tokens")
        out.append(np.memmap(p, dtype=dtype, mode="r") if f["tokens"] else np.zeros(0, dtype))
    return out
