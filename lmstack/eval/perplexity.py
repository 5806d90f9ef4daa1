"""Perplexity and bits per byte with a strided sliding window.

PPL = exp(total NLL / scored tokens); bits per byte = total NLL / (ln 2 * UTF-8 bytes) (Gao et al. 2020,
"The Pile", sec. 4), which compares models with different tokenizers. Windows follow the ``transformers``
guide "Perplexity of fixed-length models": window length ``max_length``, step ``stride``.

Inputs: a ``.txt`` file (one document), a ``.jsonl`` file (``text_field`` per record, one document each), or
token shards: a ``.bin`` file or a directory of them (flat uint16/uint32, dtype from the shard index JSON).
Shards are one token stream; their bytes are counted by decoding the tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lmstack.errors import DataError
from lmstack.eval.records import read_records


def _load_documents(task) -> tuple[list[list[int]] | None, list[str] | None, int, list[str]]:
    """(token docs or None, text docs or None, skipped, skipped examples)."""
    p = Path(task.data)
    if not p.exists():
        raise DataError(f"task {task.name}: data {p} not found (the path is relative to the task YAML)")
    if p.is_dir() or p.suffix == ".bin":
        return _load_shards(task, p), None, 0, []
    if p.suffix == ".jsonl":
        recs = read_records(p, task.name, "jsonl")
        docs = [str(r.get(task.name, task.text_field)) for r in recs.items]
        return None, docs, recs.skipped, recs.skipped_examples
    try:
        return None, [p.read_text(encoding="utf-8")], 0, []
    except UnicodeDecodeError as e:
        raise DataError(f"task {task.name}: {p}: not UTF-8 text at byte {e.start}") from None


def _shard_dtype(task, f: Path) -> np.dtype:
    if task.shard_dtype != "auto":
        return np.dtype(task.shard_dtype)
    for idx in sorted(f.parent.glob("*.json")):
        try:
            meta = json.loads(idx.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and "dtype" in meta:
            return np.dtype(meta["dtype"])
    raise DataError(f"task {task.name}: {f}: no shard index JSON with a 'dtype' beside it; "
                    "set shard_dtype: uint16 or uint32 in the task")


def _load_shards(task, p: Path) -> list[list[int]]:
    files = sorted(p.glob("*.bin")) if p.is_dir() else [p]
    if not files:
        raise DataError(f"task {task.name}: {p}: no *.bin token shards in the directory")
    dt = _shard_dtype(task, files[0])
    toks = np.concatenate([np.memmap(f, dtype=dt, mode="r") for f in files])
    return [toks.astype(np.int64).tolist()]


def evaluate_perplexity(lm, task, progress=None) -> dict:
    token_docs, text_docs, skipped, skipped_ex = _load_documents(task)
    if token_docs is None:
        if task.limit:
            text_docs = text_docs[:task.limit]
        token_docs = [lm.tok.encode(t) for t in text_docs]
        n_bytes = sum(len(t.encode("utf-8")) for t in text_docs)
    else:
        if task.limit:
            token_docs = [d[:task.limit] for d in token_docs]
        n_bytes = sum(len(lm.tok.decode(d, skip_special_tokens=False).encode("utf-8")) for d in token_docs)
    vocab = lm.model.config.vocab_size
    bos = [lm.bos_id] if task.add_bos and lm.bos_id is not None else []
    reqs, doc_of = [], []
    for di, ids in enumerate(token_docs):
        if ids and max(ids) >= vocab:
            raise DataError(f"task {task.name}: token id {max(ids)} in {task.data} is outside the model's "
                            f"vocabulary ({vocab}); were the shards made with this model's tokenizer?")
        for w in lm.rolling_windows(bos + ids, task.max_length, task.stride):
            reqs.append(w)
            doc_of.append(di)
    if not reqs:
        raise DataError(f"task {task.name}: {task.data}: no tokens to score")
    cb = None
    if progress is not None:
        bar = progress.add_task(f"{task.name} (ppl)", total=len(reqs))
        cb = lambda k: progress.advance(bar, k)  # noqa: E731
    scores = lm.loglikelihood_tokens(reqs, cb)
    nll = -sum(s for s, _ in scores)
    n_tok = sum(len(c) for _, c in reqs)
    per_doc = [0.0] * len(token_docs)
    for (s, _), d in zip(scores, doc_of):
        per_doc[d] -= s
    return {
        "metrics": {
            "perplexity": math.exp(nll / n_tok),
            "bits_per_byte": nll / (math.log(2) * max(n_bytes, 1)),
            "nll_per_token": nll / n_tok,
        },
        "n": len(token_docs),
        "n_tokens": n_tok,
        "n_bytes": n_bytes,
        "n_windows": len(reqs),
        "skipped": skipped,
        "skipped_examples": skipped_ex,
        "samples": [{"doc": i, "nll": v} for i, v in enumerate(per_doc)][:50],
    }
