"""Helpers for the training tests: tiny token shards written by hand in the lmstack-shards-v1 format
(independent of lmstack.data, so the reader is tested against the format, not against its own writer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

TINY_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def write_shards(root: Path, *, train_tokens: int = 4000, val_tokens: int = 600, vocab: int = 256,
                 n_files: int = 2, seed: int = 0, tokenizer_json: bytes | None = b'{"fake": "tokenizer"}',
                 eos: int = 2) -> Path:
    """Documents of a learnable pattern (counting mod 50 from a random start) separated by EOS."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def stream(n: int) -> np.ndarray:
        out: list[int] = []
        while len(out) < n:
            start, length = int(rng.integers(3, 50)), int(rng.integers(10, 60))
            out.extend(3 + (start + np.arange(length)) % 50)
            out.append(eos)
        return np.asarray(out[:n], dtype=np.uint16)

    splits = {}
    for split, total, nf in (("train", train_tokens, n_files), ("val", val_tokens, 1)):
        files = []
        per = total // nf if nf else 0
        for i in range(nf):
            arr = stream(per)
            name = f"{split}_{i:05d}.bin"
            arr.tofile(root / name)
            files.append({"path": name, "tokens": int(len(arr)), "documents": int((arr == eos).sum())})
        splits[split] = {"files": files, "tokens": sum(f["tokens"] for f in files),
                         "documents": sum(f["documents"] for f in files)}
    sha = None
    tok_dir = None
    if tokenizer_json is not None:
        tok_dir = root / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        (tok_dir / "tokenizer.json").write_bytes(tokenizer_json)
        sha = hashlib.sha256(tokenizer_json).hexdigest()
    index = {"format": "lmstack-shards-v1", "dtype": "uint16", "vocab_size": vocab, "eos_token_id": eos,
             "tokenizer_sha256": sha, "tokenizer_dir": str(tok_dir) if tok_dir else None,
             "splits": splits, "sources": []}
    (root / "index.json").write_text(json.dumps(index))
    return root
