"""Second-stage reranking of a retriever's top candidates (``DocRetriever(..., reranker=...)``,
``lmstack rag search|ask|eval --rerank``, ``lmstack serve --rag-rerank``).

The first stage (BM25, dense or their reciprocal-rank fusion) ranks the whole index cheaply; a reranker rescores
only its top ``rerank_depth`` (default 20) candidates with something more expensive or better informed, and the
hits come back in the reranker's order with its score.

- :class:`CrossEncoderReranker`: a sentence-transformers ``CrossEncoder`` directory (query and passage read
  together by one transformer, Nogueira & Cho 2019) -- any local one; nothing is downloaded.
- :class:`LLMReranker` (``llm:MODEL`` / ``llm-yes:MODEL``): a causal language model (an lmstack / HF model
  directory or a ``.gguf`` file) scores each candidate with one forward pass, no generation: by default the
  *query likelihood* of the question given the passage (UPR, Sachan et al. 2022: the mean log-probability of the
  question's tokens as the reply to "Passage: ... Write a question that this passage answers."), or, with
  ``llm-yes:``, the relevance judgement ``log p("Yes") - log p("No")`` as the reply to "Passage: ... Question:
  ... Does the passage answer the question? Answer Yes or No." (pointwise relevance generation).
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


LLM_METHODS = {"llm": "query-likelihood", "llm-yes": "yes-no"}
QL_PROMPT = "Passage: {passage}\n\nWrite a question that this passage answers."
YES_PROMPT = ("Passage: {passage}\n\nQuestion: {question}\n\nDoes the passage answer the question? "
              "Answer Yes or No.")
MAX_PASSAGE_CHARS = 4000


class LLMReranker:
    """A causal LM's judgement of each (query, candidate) pair (module docstring): ``method`` is
    ``"query-likelihood"`` (score = mean log p(question tokens | passage prompt)) or ``"yes-no"`` (score =
    log p(Yes) - log p(No) as the first reply tokens). The prompt is the model's chat template (one user turn,
    then the assistant's turn), with control tokens inside the passage encoded as plain text: a document cannot
    end the turn. ``lm``: an :class:`lmstack.eval.lm.EvalLM` (one forward pass per candidate, batched)."""

    kind = "llm"

    def __init__(self, lm: Any, method: str = "query-likelihood", max_passage_chars: int = MAX_PASSAGE_CHARS):
        if method not in LLM_METHODS.values():
            raise ConfigError(f"LLM reranking method {method!r}: expected one of {', '.join(LLM_METHODS.values())}")
        self.lm, self.method, self.max_passage_chars = lm, method, int(max_passage_chars)

    @classmethod
    def load(cls, model: str | Path, method: str = "query-likelihood", device: str | None = None) -> "LLMReranker":
        from lmstack.eval.lm import EvalLM

        return cls(EvalLM.load(model, device=device), method)

    def _context(self, text: str) -> list[int]:
        tok = self.lm.tok
        msgs = [{"role": "user", "content": text}]
        if getattr(tok, "chat_template", None):
            return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, sanitize=True))
        return self.lm.prefix_ids() + tok.encode(text + "\n")  # a base model without a template: plain text

    def requests(self, query: str, hits: Sequence[Hit]) -> list[tuple[list[int], list[int]]]:
        """The (context ids, continuation ids) pairs scored: one per candidate (query likelihood), or two per
        candidate, Yes then No (yes-no)."""
        tok, reqs = self.lm.tok, []
        for h in hits:
            passage = (f"{h.chunk.title}\n{h.chunk.text}" if h.chunk.title else h.chunk.text)[:self.max_passage_chars]
            if self.method == "query-likelihood":
                reqs.append((self._context(QL_PROMPT.format(passage=passage)), tok.encode(query.strip())))
            else:
                ctx = self._context(YES_PROMPT.format(passage=passage, question=query.strip()))
                reqs += [(ctx, tok.encode("Yes")), (ctx, tok.encode("No"))]
        return reqs

    def scores(self, query: str, hits: Sequence[Hit]) -> list[float]:
        reqs = self.requests(query, hits)
        out = [s for s, _ in self.lm.loglikelihood_tokens(reqs)]
        if self.method == "query-likelihood":
            return [s / max(1, len(cont)) for s, (_, cont) in zip(out, reqs)]
        return [out[2 * i] - out[2 * i + 1] for i in range(len(hits))]

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
    """A reranker from ``spec``: a ``.json`` file written by ``lmstack rag fit-reranker`` (feature weights), a
    local sentence-transformers CrossEncoder directory, or ``llm:MODEL`` / ``llm-yes:MODEL`` (a causal LM
    directory or ``.gguf`` file: :class:`LLMReranker` by query likelihood / by its Yes-No judgement)."""
    text = str(spec)
    for prefix, method in LLM_METHODS.items():
        if text.startswith(prefix + ":"):
            model = Path(text[len(prefix) + 1:]).expanduser()
            if not (model.is_dir() and (model / "config.json").is_file()) and not (
                    model.is_file() and model.suffix == ".gguf"):
                raise ConfigError(f"--rerank {spec}: {model} is not a model directory (with config.json) "
                                  "or a .gguf file")
            return LLMReranker.load(model, method, device=device)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".json":
        return FeatureReranker.load(p)
    if p.is_dir() and (p / "config.json").is_file():
        return CrossEncoderReranker(p, device=device)
    raise ConfigError(f"--rerank {spec}: expected a reranker .json (lmstack rag fit-reranker), a local "
                      "sentence-transformers CrossEncoder directory, or llm:MODEL / llm-yes:MODEL (a causal LM)")


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
