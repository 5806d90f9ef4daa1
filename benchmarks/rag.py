"""RAG: indexing speed, query latency and recall of lmstack's document index vs LlamaIndex, and exact vs ANN search at
scale.

Part 1 (the shipped labelled set, recipes/data/rag_eval: 88 pages, 82 held-out questions EN + ZH, the packaged
all-MiniLM-L6-v2): lmstack ``rag index`` (load, chunk, embed, write SQLite) against LlamaIndex's default in-memory
``VectorStoreIndex`` built on the same chunks with the same embedder (wrapped as a LlamaIndex embedding), then
recall@5 and per-query latency of lmstack's BM25 / dense / hybrid against LlamaIndex's vector retriever, its
``BM25Retriever`` (bm25s) and their reciprocal-rank fusion (``QueryFusionRetriever``, one query, no LLM).

Part 2 (random unit vectors, 384-d): per-query latency p50 / p99 of exact search (numpy) and usearch's HNSW, and
the ANN's recall@10 against exact, at each size; and BM25 (SQLite FTS5) query latency over an index of that many
chunks written by ``index_documents``.

    pip install 'lmstack[rag,rag-bench]'   # LlamaIndex, the baseline (no torch change)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rag.py [--sizes 10000 100000] [--threads 2] [--skip-llamaindex]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data" / "rag_eval"


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) * 1000  # ms


def part1(threads: int, skip_llamaindex: bool) -> None:
    from lmstack.rag.dense import load_embedder
    from lmstack.rag.evaluate import is_relevant, read_questions
    from lmstack.rag.index import DocRetriever, index_documents

    emb = load_embedder()
    emb.encode(["warm up"])
    qs = read_questions(DATA / "questions.jsonl")
    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    rep = index_documents([DATA / "docs"], tmp / "i.sqlite", embedder=emb, dense_langs=["en"])
    t_ours = time.perf_counter() - t
    print(f"lmstack index: {rep.documents_total} docs, {rep.chunks_total} chunks ({rep.vectors_written} embedded) "
          f"in {t_ours:.2f} s = {rep.documents_total / t_ours:.1f} docs/s, {rep.chunks_total / t_ours:.1f} chunks/s")
    r = DocRetriever(tmp / "i.sqlite", embedder=emb)
    rows = {}
    for mode in ("bm25", "dense", "hybrid"):
        lat, hit = [], 0
        for q in qs:
            t = time.perf_counter()
            hits = r.search(q["question"], 5, mode=mode)
            lat.append(time.perf_counter() - t)
            hit += any(is_relevant(h.chunk, q["relevant"]) for h in hits)
        rows[f"lmstack {mode}"] = (hit / len(qs), pct(lat, 50), pct(lat, 99))
    if not skip_llamaindex:
        rows.update(llamaindex(r, emb, qs, is_relevant))
    print(f"\n{'retriever':<28} {'recall@5':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rec, p50, p99) in rows.items():
        print(f"{name:<28} {rec:>8.3f} {p50:>8.2f} {p99:>8.2f}")
    if "llamaindex fusion" in rows:
        a, b = rows["lmstack hybrid"], rows["llamaindex fusion"]
        print(f"hybrid vs fusion: recall {a[0]:.3f} vs {b[0]:.3f}; p50 latency ratio (llamaindex / lmstack) "
              f"{b[1] / a[1]:.2f}x")


def llamaindex(r, emb, qs, is_relevant) -> dict:
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.retrievers import QueryFusionRetriever
    from llama_index.core.schema import TextNode
    from llama_index.retrievers.bm25 import BM25Retriever

    from lmstack.rag.dense import encode

    class MiniLM(BaseEmbedding):  # the same model and normalisation as lmstack's index
        def _get_query_embedding(self, query):
            return encode(emb, [query])[0].tolist()

        def _get_text_embedding(self, text):
            return encode(emb, [text])[0].tolist()

        def _get_text_embeddings(self, texts):
            return encode(emb, texts).tolist()

        async def _aget_query_embedding(self, query):
            return self._get_query_embedding(query)

    Settings.llm = None
    rows = r.con.execute("SELECT rowid, id, doc_id, text, title, lang, source, keywords, headings, page, start, "
                         '"end" FROM chunks ORDER BY rowid').fetchall()
    chunks = r.chunks([x[0] for x in rows])
    # the same text lmstack embeds (title + text) and the same chunks; English only is not modelled: LlamaIndex's
    # vector index holds every chunk
    nodes = [TextNode(text=f"{c.title}\n{c.text}" if c.title else c.text, id_=c.id,
                      metadata={"source": c.source}) for c in chunks.values()]
    by_id = {c.id: c for c in chunks.values()}
    t = time.perf_counter()
    index = VectorStoreIndex(nodes, embed_model=MiniLM(embed_batch_size=64), show_progress=False)
    t_build = time.perf_counter() - t
    print(f"llamaindex VectorStoreIndex (embedding the same {len(nodes)} chunks): {t_build:.2f} s = "
          f"{len(nodes) / t_build:.1f} chunks/s")
    vec = index.as_retriever(similarity_top_k=5)
    bm25 = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=5)
    fusion = QueryFusionRetriever([vec, bm25], similarity_top_k=5, num_queries=1, mode="reciprocal_rerank",
                                  use_async=False, llm=None)
    out = {}
    for name, ret in (("llamaindex vector", vec), ("llamaindex bm25", bm25), ("llamaindex fusion", fusion)):
        lat, hit = [], 0
        for q in qs:
            t = time.perf_counter()
            got = ret.retrieve(q["question"])
            lat.append(time.perf_counter() - t)
            hit += any(is_relevant(by_id[n.node.id_], q["relevant"]) for n in got[:5])
        out[name] = (hit / len(qs), pct(lat, 50), pct(lat, 99))
    return out


def part2(sizes: list[int], n_queries: int) -> None:
    from lmstack.rag.index import DocRetriever, index_documents
    from lmstack.rag.vectors import ExactStore, USearchStore

    rng = np.random.default_rng(0)
    print(f"\n{'chunks':>8} {'store':<8} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9}")
    words = "router fan kettle warranty refund shipping cable port reset light speed mode order label price".split()
    for n in sizes:
        vecs = rng.standard_normal((n, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        ids = np.arange(n)
        # queries near stored vectors (noise of norm ~0.5 on unit vectors): a nearest-neighbour structure to find
        qs = vecs[rng.integers(0, n, n_queries)] + 0.025 * rng.standard_normal((n_queries, 384)).astype(np.float32)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        results = {}
        for name, cls in (("exact", ExactStore), ("usearch", USearchStore)):
            t = time.perf_counter()
            store = cls(ids, vecs)
            build = time.perf_counter() - t
            lat, got = [], []
            for q in qs:
                t = time.perf_counter()
                got.append([i for i, _ in store.search(q, 10)])
                lat.append(time.perf_counter() - t)
            results[name] = got
            rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, results["exact"])])
            print(f"{n:>8} {name:<8} {build:>8.2f} {pct(lat, 50):>8.2f} {pct(lat, 99):>8.2f} {rec:>9.3f}")
        tmp = Path(tempfile.mkdtemp())
        (tmp / "d").mkdir()
        lines = ["sku,text"] + [f"s{i}," + " ".join(rng.choice(words, 12)) + f" item{i}" for i in range(n)]
        (tmp / "d" / "rows.csv").write_text("\n".join(lines) + "\n")
        t = time.perf_counter()
        rep = index_documents([tmp / "d"], tmp / "i.sqlite", embedder=None, chunk_tokens=24, overlap=0)
        build = time.perf_counter() - t
        r = DocRetriever(tmp / "i.sqlite")
        lat = []
        for i in range(n_queries):
            q = " ".join(rng.choice(words, 3)) + f" item{int(rng.integers(0, n))}"
            t = time.perf_counter()
            r.search(q, 10, mode="bm25")
            lat.append(time.perf_counter() - t)
        print(f"{rep.chunks_total:>8} {'bm25':<8} {build:>8.2f} {pct(lat, 50):>8.2f} {pct(lat, 99):>8.2f} "
              f"{'-':>9}   (index_documents: {rep.chunks_total / build:.0f} chunks/s without embeddings)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llamaindex", action="store_true")
    ap.add_argument("--skip-part1", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not a.skip_part1:
        part1(a.threads, a.skip_llamaindex)
    part2(a.sizes, a.queries)


if __name__ == "__main__":
    main()
