"""RAG at ~100k chunks: lmstack's document index (``index_documents`` + ``DocRetriever``) on a deterministic synthetic
corpus plus the real docs of recipes/data/rag_eval, against named baselines in the same run.

Measured: full index time (docs/s, chunks/s), incremental re-index after changing 1% of the files, query latency
p50 / p95 / p99 of BM25 (SQLite FTS5), dense exact (numpy) and dense HNSW (usearch), hybrid (RRF); resident memory of
the open retriever; recall@10 of HNSW against exact. Baselines: ``bm25s`` (BM25 over the same chunk texts, its
own in-memory index) and scikit-learn's brute-force ``NearestNeighbors`` (cosine) over the same vectors.

The embedder is a deterministic hashing embedder (analysed terms hashed into 384 dims, L2-normalised): embedding
100k chunks with MiniLM takes hours on two shared cores, and what is measured here is the index and the stores,
not the encoder (MiniLM's per-query encoding cost is in benchmarks/rag.py). The corpus: ``--files`` markdown files
of ``--sections`` sections, each a heading and a paragraph of words drawn from a Zipf-distributed vocabulary of
20,000 words (English-like) with one Chinese sentence in one section of ten; queries are 4 words of one chunk.

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/rag_scale.py --files 1000 --sections 100 --threads 2

``--index PATH`` reuses an index an earlier run built with ``--keep`` (the same hashing embedder) and measures the
queries only (building 100k chunks takes ~5 minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HAN = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"


class HashEmbedder:
    """Deterministic 384-d embeddings: analysed terms hashed to signed coordinates, L2-normalised."""

    lmstack_name = "hash-384"

    def encode(self, texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True):
        from lmstack.rag.analyze import terms

        out = np.zeros((len(texts), 384), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in terms(t):
                h = zlib.crc32(w.encode())
                out[i, h % 384] += 1.0 if (h >> 16) & 1 else -1.0
            out[i] /= np.linalg.norm(out[i]) or 1.0
        return out


def pct(xs, p):
    return float(np.percentile(np.asarray(xs), p)) * 1000


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_corpus(d: Path, files: int, sections: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    ranks = np.arange(1, len(vocab) + 1)
    p = 1.0 / ranks ** 1.1
    p /= p.sum()
    texts = []
    for f in range(files):
        parts = [f"# Manual {f}\n"]
        for s in range(sections):
            words = rng.choice(len(vocab), size=int(rng.integers(25, 60)), p=p)
            para = " ".join(vocab[i] for i in words) + "."
            if s % 10 == 0:
                para += " " + "".join(rng.choice(list(HAN), 20)) + "。"
            parts.append(f"## Section {s}\n\n{para}\n")
            texts.append(para)
        (d / f"m{f:05d}.md").write_text("\n".join(parts), encoding="utf-8")
    return texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--sections", type=int, default=100)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-usearch", action="store_true")
    ap.add_argument("--index", help="Reuse this index (built by an earlier run with --keep): queries only.")
    ap.add_argument("--keep", action="store_true", help="Keep the corpus and index (their folder is printed).")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    emb = HashEmbedder()
    if a.index:
        index, tmp = Path(a.index), None
        print(f"reusing {index} ({index.stat().st_size / 2**20:.0f} MiB); load average {os.getloadavg()}")
    else:
        tmp, index = build(a, emb)
    query_part(a, index, emb)
    if tmp is not None and not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        print(f"kept {tmp}")


def build(a, emb):
    from lmstack.rag.index import index_documents

    tmp = Path(tempfile.mkdtemp(prefix="rag_scale_"))
    docs = tmp / "docs"
    (docs / "synthetic").mkdir(parents=True)
    shutil.copytree(ROOT / "recipes" / "data" / "rag_eval" / "docs", docs / "real")
    t = time.perf_counter()
    make_corpus(docs / "synthetic", a.files, a.sections)
    print(f"corpus: {a.files} synthetic files x {a.sections} sections + 88 real pages, written in "
          f"{time.perf_counter() - t:.1f} s; load average {os.getloadavg()}")
    index = tmp / "i.sqlite"
    t = time.perf_counter()
    rep = index_documents([docs], index, embedder=emb, dense_langs=None, chunk_tokens=128, overlap=0)
    full = time.perf_counter() - t
    print(f"full index: {rep.documents_total} docs, {rep.chunks_total} chunks, {rep.vectors_written} vectors in "
          f"{full:.1f} s = {rep.documents_total / full:.1f} docs/s, {rep.chunks_total / full:.0f} chunks/s; "
          f"file {index.stat().st_size / 2**20:.0f} MiB")
    changed = sorted((docs / "synthetic").iterdir())[:: 100]  # 1% of the files
    for f in changed:
        f.write_text(f.read_text(encoding="utf-8") + "\n## Added\n\nw1 w2 w3 changed.\n", encoding="utf-8")
    t = time.perf_counter()
    rep2 = index_documents([docs], index, embedder=emb, dense_langs=None, chunk_tokens=128, overlap=0)
    inc = time.perf_counter() - t
    print(f"incremental: {len(rep2.updated)} changed files ({len(changed)} edited), {len(rep2.unchanged)} unchanged, "
          f"{rep2.chunks_written} chunks re-embedded in {inc:.1f} s ({full / inc:.1f}x faster than the full index)")
    return tmp, index


def query_part(a, index, emb):
    from lmstack.rag.index import DocRetriever
    from lmstack.rag.vectors import ExactStore, USearchStore

    # queries: 4 words of a random chunk
    before = rss_mb()
    r = DocRetriever(index, embedder=emb, store="exact")
    after = rss_mb()
    rng = np.random.default_rng(1)
    n = len(r)
    rows = [r.con.execute("SELECT text FROM chunks WHERE rowid = ?", (int(x),)).fetchone()
            for x in rng.integers(1, n + 1, a.queries)]
    queries = [" ".join(rng.choice(t[0].split()[:40], 4)) for t in rows if t]
    print(f"retriever opened: {n} chunks, RSS +{after - before:.0f} MiB (vectors in memory), load average "
          f"{os.getloadavg()}")
    res = {}

    def timed(name, fn):
        lat, out = [], []
        for q in queries:
            t = time.perf_counter()
            out.append(fn(q))
            lat.append(time.perf_counter() - t)
        res[name] = (pct(lat, 50), pct(lat, 95), pct(lat, 99))
        return out

    timed("lmstack bm25 (FTS5)", lambda q: r.search(q, 10, mode="bm25"))
    timed("lmstack dense exact", lambda q: [h.chunk.id for h in r.search(q, 10, mode="dense")])
    timed("lmstack hybrid (exact)", lambda q: r.search(q, 10, mode="hybrid"))
    ids = np.array([x for (x,) in r.con.execute("SELECT chunk_rowid FROM dense ORDER BY chunk_rowid")])
    vecs = r.vectors.vecs
    qv = emb.encode(queries)
    store_res = {}
    for name, cls in (("exact", ExactStore), ("usearch", USearchStore)):
        if name == "usearch" and a.skip_usearch:
            continue
        t = time.perf_counter()
        st = cls(ids, vecs)
        built = time.perf_counter() - t
        lat, got = [], []
        for v in qv:
            t = time.perf_counter()
            got.append([i for i, _ in st.search(v, 10)])
            lat.append(time.perf_counter() - t)
        store_res[name] = got
        rec = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(got, store_res["exact"])])
        res[f"store {name} (vector search only)"] = (pct(lat, 50), pct(lat, 95), pct(lat, 99))
        print(f"store {name}: build {built:.1f} s, recall@10 vs exact {rec:.3f}")
    # baselines, same vectors / same texts
    from sklearn.neighbors import NearestNeighbors

    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=10, algorithm="brute", metric="cosine").fit(vecs)
    print(f"sklearn NearestNeighbors(brute, cosine) fit {time.perf_counter() - t:.1f} s")
    lat = []
    for v in qv:
        t = time.perf_counter()
        nn.kneighbors(v[None], 10)
        lat.append(time.perf_counter() - t)
    res["baseline sklearn brute force"] = (pct(lat, 50), pct(lat, 95), pct(lat, 99))
    import bm25s

    texts = [t for (t,) in r.con.execute("SELECT text FROM chunks ORDER BY rowid")]
    t = time.perf_counter()
    bm = bm25s.BM25()
    bm.index(bm25s.tokenize(texts, show_progress=False), show_progress=False)
    print(f"bm25s index of the same {len(texts)} chunk texts: {time.perf_counter() - t:.1f} s")
    lat = []
    for q in queries:
        t = time.perf_counter()
        bm.retrieve(bm25s.tokenize([q], show_progress=False), k=10, show_progress=False)
        lat.append(time.perf_counter() - t)
    res["baseline bm25s"] = (pct(lat, 50), pct(lat, 95), pct(lat, 99))
    print(f"\n{'search (k=10, ' + str(len(queries)) + ' queries)':<40} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for name, (p50, p95, p99) in res.items():
        print(f"{name:<40} {p50:>8.2f} {p95:>8.2f} {p99:>8.2f}")
    b, s = res["lmstack bm25 (FTS5)"], res["baseline bm25s"]
    e, k = res["store exact (vector search only)"], res["baseline sklearn brute force"]
    print(f"ratios (p50): lmstack FTS5 BM25 / bm25s {b[0] / s[0]:.1f}x (above 1: lmstack slower); sklearn brute "
          f"force / lmstack exact store {k[0] / e[0]:.1f}x (above 1: lmstack faster); load average {os.getloadavg()}")
    r.close()


if __name__ == "__main__":
    main()
