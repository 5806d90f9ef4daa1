"""Vector search behind one small interface, so the index can grow past exact search.

    store = make_store(ids, vecs, ann_above=100_000)    # exact below the threshold, usearch's HNSW above it
    store.search(query_vec, n)                          # [(id, cosine)], best first

``vecs`` are L2-normalised float32 rows, so the inner product is the cosine similarity.

- :class:`ExactStore`: one matrix product and a partial sort (``np.argpartition``): exact, O(N * dim) per query,
  ~10 ms at 100k x 384 on one core.
- :class:`USearchStore`: an HNSW graph (``usearch``, Malkov & Yashunin 2018) built in memory from the same
  vectors; sub-millisecond queries with a small recall loss (measured in docs/benchmarks.md). Used above
  ``ann_above`` vectors when ``usearch`` is installed.
- :class:`QdrantStore`: the same vectors in a Qdrant collection -- ``qdrant-client``'s local mode (``":memory:"``
  or a folder, exact search, for tests and small deployments) or a Qdrant server (``http://host:6333``), for an
  index that outgrows one process's memory. The collection is synced from the SQLite index when the retriever
  opens (points upserted by chunk rowid; the SQLite file stays the source of truth).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class VectorStore(Protocol):
    def search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        """``[(id, cosine similarity)]`` of the ``n`` nearest vectors, best first."""
        ...

    def __len__(self) -> int: ...


class ExactStore:
    def __init__(self, ids: np.ndarray, vecs: np.ndarray):
        self.ids, self.vecs = np.asarray(ids, dtype=np.int64), np.ascontiguousarray(vecs, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        if not len(self.ids) or n <= 0:
            return []
        sims = self.vecs @ np.asarray(query, dtype=np.float32)  # (N,)
        n = min(n, len(sims))
        top = np.argpartition(-sims, n - 1)[:n] if n < len(sims) else np.arange(len(sims))
        top = top[np.lexsort((self.ids[top], -sims[top]))]  # best first; ties by id
        return [(int(self.ids[i]), float(sims[i])) for i in top]


class USearchStore:
    def __init__(self, ids: np.ndarray, vecs: np.ndarray, *, connectivity: int = 16, expansion_add: int = 128,
                 expansion_search: int = 64):
        from usearch.index import Index

        self.ids = np.asarray(ids, dtype=np.int64)
        self.index = Index(ndim=vecs.shape[1], metric="ip", dtype="f32", connectivity=connectivity,
                           expansion_add=expansion_add, expansion_search=expansion_search)
        if len(self.ids):
            self.index.add(np.arange(len(self.ids), dtype=np.uint64), np.ascontiguousarray(vecs, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        if not len(self.ids) or n <= 0:
            return []
        m = self.index.search(np.asarray(query, dtype=np.float32), min(n, len(self.ids)))
        # usearch's "ip" distance is 1 - inner product
        return [(int(self.ids[int(k)]), 1.0 - float(d)) for k, d in zip(m.keys, m.distances)]


class QdrantStore:
    def __init__(self, ids: np.ndarray, vecs: np.ndarray, *, location: str = ":memory:",
                 collection: str = "lmstack_rag", batch: int = 1024):
        try:
            from qdrant_client import QdrantClient, models
        except ImportError:
            from lmstack.errors import ConfigError

            raise ConfigError("the Qdrant store needs qdrant-client: pip install qdrant-client") from None
        if location.startswith(("http://", "https://")):
            self.client = QdrantClient(url=location)
        elif location == ":memory:":
            self.client = QdrantClient(location=":memory:")
        else:
            self.client = QdrantClient(path=location)  # local mode, persisted in a folder
        self.collection, self.n = collection, len(ids)
        dim = int(vecs.shape[1]) if vecs.ndim == 2 and vecs.shape[1] else 1
        if self.client.collection_exists(collection):
            self.client.delete_collection(collection)
        self.client.create_collection(collection, vectors_config=models.VectorParams(size=dim,
                                                                                   distance=models.Distance.DOT))
        for i in range(0, len(ids), batch):
            self.client.upsert(collection, points=models.Batch(ids=[int(x) for x in ids[i:i + batch]],
                                                               vectors=vecs[i:i + batch].astype(np.float32).tolist()))

    def __len__(self) -> int:
        return self.n

    def search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        if not self.n or n <= 0:
            return []
        res = self.client.query_points(self.collection, query=np.asarray(query, np.float32).tolist(), limit=n)
        return sorted(((int(p.id), float(p.score)) for p in res.points), key=lambda t: (-t[1], t[0]))


STORES = ("auto", "exact", "usearch", "qdrant")


def make_store(ids: np.ndarray, vecs: np.ndarray, *, ann_above: int = 100_000, kind: str = "auto",
               location: str = ":memory:") -> VectorStore:
    """``auto``: exact search up to ``ann_above`` vectors, above it usearch's HNSW when installed (else still
    exact); or the store named by ``kind`` (``qdrant`` at ``location``)."""
    if kind not in STORES:
        from lmstack.errors import ConfigError

        raise ConfigError(f"vector store must be one of {', '.join(STORES)}, got {kind!r}")
    if kind == "exact":
        return ExactStore(ids, vecs)
    if kind == "usearch":
        return USearchStore(ids, vecs)
    if kind == "qdrant":
        return QdrantStore(ids, vecs, location=location)
    if len(ids) > ann_above:
        try:
            return USearchStore(ids, vecs)
        except ImportError:
            pass
    return ExactStore(ids, vecs)
