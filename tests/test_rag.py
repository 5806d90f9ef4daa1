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
