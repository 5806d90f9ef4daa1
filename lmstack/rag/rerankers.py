"""Second-stage reranking of a retriever's top candidates (``DocRetriever(..., reranker=...)``,
``lmstack rag search|ask|eval --rerank``, ``lmstack serve --rag-rerank``).

The first stage (BM25, dense or their reciprocal-rank fusion) ranks the whole index cheaply; a reranker rescores
only its top ``rerank_depth`` (default 20) candidates with something more expensive or better informed, and the
hits come back in the reranker's order with its score.

- :class:`CrossEncoderReranker`: a sentence-transformers ``CrossEncoder`` directory (query and passage read
  together by one transformer, Nogueira & Cho 2019) -- any local one; nothing is downloaded.
- :class:`FeatureReranker`: lmstack's :class:`~lmstack.rag.rerank.LinearRanker` over retrieval features of each
  candidate (below), fit listwise on labelled questions that are not the evaluated ones
  (:func:`fit_feature_reranker`, ``lmstack rag fit-reranker``). Cheap (no model call beyond the first stage's
  query embedding), and it learns how much to trust BM25 vs the embeddings per language.

Features of a candidate (each in [0, 1], 0 when absent):

=================  ====================================================================================
``first``          1 / its first-stage rank
``bm25``           its BM25 score / the best BM25 score among the candidates
``dense``          cosine of query and chunk embeddings (best view), when the index has vectors for it
``overlap``        share of the query's distinct index terms found in the chunk's title and text
``title``          share of the query's distinct index terms found in the chunk's title / heading path
``zh_bm25``        ``bm25`` for a Chinese query (so the weights of BM25 can differ by language)
``zh_dense``       ``dense`` for a Chinese query
=================  ====================================================================================

    rr = load_reranker("reranker.json")          # or a CrossEncoder directory
    DocRetriever("docs.sqlite", reranker=rr).search("How long is the warranty?", k=5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmstack.errors import ConfigError
from lmstack.rag.store import Hit

FEATURES = ("first", "bm25", "dense", "overlap", "title", "zh_bm25", "zh_dense")


def _rehit(hits: Sequence[Hit], scores: Sequence[float], k: int) -> list[Hit]:
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))[:k]  # ties: the first stage's order
    return [Hit(hits[i].chunk, float(scores[i]), n + 1) for n, i in enumerate(order)]


class CrossEncoderReranker:
    """A local sentence-transformers ``CrossEncoder`` directory scoring (query, title + text) pairs."""

    kind = "cross-encoder"

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 32, max_length: int = 512):
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise ConfigError("a cross-encoder reranker needs sentence-transformers: pip install 'lmstack[rag]'") from None
        self.path = str(path)
        self.model = CrossEncoder(self.path, device=device, max_length=max_length)
        self.batch_size = batch_size

    def scores(self, query: str, hits: Sequence[Hit]) -> list[float]:
        pairs = [(query, f"{h.chunk.title}\n{h.chunk.text}" if h.chunk.title else h.chunk.text) for h in hits]
        out = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True)
        return [float(x) for x in np.asarray(out, dtype=np.float64).reshape(len(hits), -1)[:, -1]]

    def rerank(self, query: str, hits: Sequence[Hit], k: int, retriever: Any = None) -> list[Hit]:
        return _rehit(hits, self.scores(query, hits), k) if hits else []


def candidate_features(query: str, hits: Sequence[Hit], retriever: Any) -> list[dict[str, float]]:
    """The feature rows (module docstring) of ``hits``, a first-stage ranking of ``query`` from ``retriever``
    (a :class:`~lmstack.rag.index.DocRetriever`)."""
    from lmstack.rag.analyze import query_lang, terms

    if not hits:
        return []
    han = getattr(retriever, "han", "bigram")
    ids = [h.chunk.id for h in hits]
    q = ",".join("?" * len(ids))
    rowid = dict(retriever.con.execute(f"SELECT id, rowid FROM chunks WHERE id IN ({q})", ids).fetchall())
    want = list(dict.fromkeys(terms(query, han)))
    # BM25 of every candidate: the query's BM25 ranking deep enough to reach them (FTS5 ranks all matches)
    bm = dict(retriever.bm25(query, max(len(hits) * 10, 200))) if want else {}
    top = max((bm.get(rowid.get(i), 0.0) for i in ids), default=0.0) or 1.0
    dense: dict[int, float] = {}
    if getattr(retriever, "vectors", None) is not None and retriever.embedder is not None:
        from lmstack.rag.dense import encode

        qv = encode(retriever.embedder, [query])[0]
        dense = retriever.similarities(qv, [rowid[i] for i in ids if i in rowid])
    zh = query_lang(query) == "zh"
    rows = []
    for n, h in enumerate(hits, 1):
        r = rowid.get(h.chunk.id)
        have = set(terms(f"{h.chunk.title}\n{h.chunk.text}", han))
        head = set(terms(f"{h.chunk.title} {getattr(h.chunk, 'headings', '')}", han))
        b = max(bm.get(r, 0.0), 0.0) / top
        d = max(dense.get(r, 0.0), 0.0) if r is not None else 0.0
        rows.append({"first": 1.0 / n, "bm25": b, "dense": d,
                     "overlap": len(have & set(want)) / len(want) if want else 0.0,
                     "title": len(head & set(want)) / len(want) if want else 0.0,
                     "zh_bm25": b if zh else 0.0, "zh_dense": d if zh else 0.0})
    return rows


class FeatureReranker:
    """:class:`~lmstack.rag.rerank.LinearRanker` weights over :func:`candidate_features`."""

    kind = "features"

    def __init__(self, ranker: Any):
        self.ranker = ranker

    @classmethod
    def load(cls, path: str | Path) -> "FeatureReranker":
        from lmstack.rag.rerank import LinearRanker

        r = LinearRanker.load(path)
        unknown = sorted(set(r.features) - set(FEATURES))
        if unknown:
            raise ConfigError(f"{path}: not a retrieval reranker (features {unknown}; expected some of "
                              f"{', '.join(FEATURES)}); fit one with `lmstack rag fit-reranker`")
        return cls(r)

    def rerank(self, query: str, hits: Sequence[Hit], k: int, retriever: Any = None) -> list[Hit]:
        if not hits:
            return []
        return _rehit(hits, self.ranker.scores(candidate_features(query, hits, retriever)), k)


def load_reranker(spec: str | Path, device: str = "cpu") -> Any:
    """A reranker from ``spec``: a ``.json`` file written by ``lmstack rag fit-reranker`` (feature weights), or a
    local sentence-transformers CrossEncoder directory."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".json":
        return FeatureReranker.load(p)
    if p.is_dir() and (p / "config.json").is_file():
        return CrossEncoderReranker(p, device=device)
    raise ConfigError(f"--rerank {spec}: expected a reranker .json (lmstack rag fit-reranker) or a local "
                      "sentence-transformers CrossEncoder directory")


def fit_feature_reranker(retriever: Any, questions: Sequence[dict[str, Any]], *, mode: str = "hybrid",
                         depth: int = 20, l2: float = 1e-2, features: Sequence[str] = FEATURES) -> Any:
    """Fit :class:`FeatureReranker` weights on labelled questions (the ``lmstack rag eval`` format; never the
    questions it will be evaluated on): each question's first-stage top ``depth`` is one group, its relevant
    chunks the gold candidates (questions whose relevant chunk the first stage missed teach nothing and are
    skipped). Returns the :class:`~lmstack.rag.rerank.LinearRanker`."""
    from lmstack.rag.evaluate import is_relevant
    from lmstack.rag.rerank import LinearRanker

    groups = []
    for q in questions:
        hits = retriever.search(q["question"], depth, mode=mode, rerank=False)
        rows = candidate_features(q["question"], hits, retriever)
        gold = [i for i, h in enumerate(hits) if is_relevant(h.chunk, q["relevant"])]
        groups.append((rows, gold))
    return LinearRanker.fit(groups, features=list(features), l2=l2,
                            info={"kind": "lmstack.rag.rerankers.FeatureReranker", "mode": mode, "depth": depth,
                                  "index": str(getattr(retriever, "path", ""))})
