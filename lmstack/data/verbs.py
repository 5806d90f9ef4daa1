"""One library function per single-step CLI verb (``lmstack data clean|dedup|stats|tokenize``).

Each builds a :class:`DataPipelineConfig` (or reads inputs directly) and calls the pipeline pieces, so the
CLI only parses arguments."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmstack.data.config import DataPipelineConfig
from lmstack.data.pipeline import _resolve, iter_records, run_pipeline
from lmstack.data.readers import ReadStats
from lmstack.errors import ConfigError
from lmstack.utils.io import file_sha256


def _inputs(paths: Sequence[str], text_field: str) -> list[dict[str, Any]]:
    if not paths:
        raise ConfigError("no inputs given: pass one or more files, directories or globs")
    return [{"path": str(p), "text_field": text_field} for p in paths]


def clean(paths: Sequence[str], out_dir: str | os.PathLike, *, text_field: str = "text",
          languages: Sequence[str] = ("en", "zh"), pii: str = "redact", quality: bool = True, workers: int = 0,
          shard: str | None = None, overrides: Sequence[str] = (), strict: bool = False) -> dict[str, Any]:
    """Normalize, language filter, quality filters and PII redaction; no dedup."""
    cfg = {"inputs": _inputs(paths, text_field), "workers": workers, "strict": strict,
           "language": {"keep": list(languages)}, "quality": {"enabled": quality},
           "pii": {"enabled": pii != "off", "action": pii if pii != "off" else "redact"},
           "dedup": {"exact": False, "near": False}}
    return run_pipeline(cfg, out_dir, shard=shard, overrides=overrides)


def dedup(paths: Sequence[str], out_dir: str | os.PathLike, *, text_field: str = "text", threshold: float = 0.8,
          num_perm: int = 128, near: bool = True, workers: int = 0, shard: str | None = None,
          overrides: Sequence[str] = (), strict: bool = False) -> dict[str, Any]:
    """Exact and (optionally) near dedup only; the text is passed through unchanged."""
    cfg = {"inputs": _inputs(paths, text_field), "workers": workers, "strict": strict,
           "normalize": {"enabled": False}, "language": {"enabled": False}, "quality": {"enabled": False},
           "pii": {"enabled": False},
           "dedup": {"exact": True, "near": near, "threshold": threshold, "num_perm": num_perm}}
    return run_pipeline(cfg, out_dir, shard=shard, overrides=overrides)


def stats(paths: Sequence[str], *, text_field: str = "text", max_docs: int | None = None) -> dict[str, Any]:
    """Counts, languages, length percentiles, PII counts and quality-rule failures, without writing anything."""
    from lmstack.text.lang import detect_language
    from lmstack.text.pii import find_pii
    from lmstack.text.quality import QualityConfig, quality_check

    cfg = DataPipelineConfig(inputs=_inputs(paths, text_field))
    read = ReadStats()
    langs, pii, fails = Counter(), Counter(), Counter()
    lengths = []
    for k, rec in enumerate(iter_records(cfg, (0, 1), read)):
        if max_docs is not None and k >= max_docs:
            break
        text = rec["text"]
        lengths.append(len(text))
        langs[detect_language(text)[0]] += 1
        pii.update(s.kind for s in find_pii(text))
        reason, _ = quality_check(text, QualityConfig())
        fails[reason or "pass"] += 1
    arr = np.asarray(lengths or [0])
    return {
        "files": [str(p) for _, _, p, _, _ in _resolve(cfg)][:50],
        "documents": len(lengths), "characters": int(arr.sum()) if lengths else 0,
        "length_percentiles": {f"p{q}": float(np.percentile(arr, q)) for q in (5, 25, 50, 75, 95, 99)},
        "languages": dict(langs.most_common()), "pii": dict(pii.most_common()),
        "quality": dict(fails.most_common()), "read": read.to_dict(),
    }


def tokenize(paths: Sequence[str], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
             text_field: str = "text", val_fraction: float = 0.01, val_documents: int | None = None,
             shard_tokens: int = 100_000_000, seed: int = 0) -> dict[str, Any]:
    """Tokenize documents from any supported input into ``lmstack-shards-v1`` token shards (EOS after each)."""
    from lmstack.data.shards import write_shards
    from lmstack.tokenizer import Tokenizer

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ConfigError(f"--tokenizer {tokenizer_dir}: no tokenizer.json there; train one with "
                          "`lmstack tokenizer train` or point at a model directory")
    cfg = DataPipelineConfig(inputs=_inputs(paths, text_field))
    files = _resolve(cfg)  # fails on missing inputs before any work
    tok = Tokenizer.from_dir(tokenizer_dir)
    read = ReadStats()
    per_file: Counter = Counter()

    def texts():
        for rec in iter_records(cfg, (0, 1), read, files):
            per_file[rec["path"]] += 1
            yield rec["text"]

    index = write_shards(texts(), tok, out_dir, val_fraction=val_fraction, val_documents=val_documents,
                         shard_tokens=shard_tokens, seed=seed, tokenizer_dir=str(tokenizer_dir),
                         sources=lambda: [{"path": str(p), "sha256": file_sha256(p), "documents": per_file.get(str(p), 0)}
                                          for _, _, p, _, _ in files])
    index["read"] = read.to_dict()
    return index
