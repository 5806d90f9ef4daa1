"""The RAG product (docs/rag.md): loaders for every file type in English and Chinese, token-bounded chunks with
offsets, the incremental index (a changed file re-embeds alone, a deleted one disappears, an interrupted run
resumes, a broken file is reported), retrieval metrics against independent references, cited answers, and the
CLI's one-line errors. The live server is in tests/test_rag_serve.py."""

from __future__ import annotations

import json

import re
import zlib

import numpy as np
import pytest

from lmstack.errors import DataError
from lmstack.rag.chunk import chunk_blocks, count_tokens, sentence_spans
from lmstack.rag.index import DocRetriever, index_documents
from lmstack.rag.loaders import Block, find_files, load_file
from tests.rag_fixtures import EN_FACT, ZH_FACT, write_corpus

pytest.importorskip("pypdf")
pytest.importorskip("docx")
pytest.importorskip("trafilatura")


class HashEmbedder:
    """A deterministic bag-of-terms embedder (feature hashing of lmstack's index terms), recording what it embeds:
    stands in for a sentence-transformers model where only the bookkeeping is tested."""

    def __init__(self, dim: int = 64, noise: float = 0.0):
        self.dim, self.calls, self.noise = dim, [], noise  # noise: a per-text random part (no tied scores)

    def encode(self, texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True):
        from lmstack.rag.analyze import terms

        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in terms(t):
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
            if self.noise:
                out[i] += self.noise * np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        return out

    def embedded(self) -> list[str]:
        return [t for c in self.calls for t in c]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "docs"
    return root, write_corpus(root)


def test_loaders_read_every_type_in_english_and_chinese(corpus):
    root, facts = corpus
    names = [s for _, s in find_files([root])]
    assert sorted(names) == sorted(facts)  # every type, both languages
    for path, source in find_files([root]):
        doc = load_file(path, source)
        assert facts[source] in doc.text, source
    assert load_file(root / "guide.zh.md").blocks[-1].headings == ("限制",)
    assert load_file(root / "guide.en.md").title == "Router guide"
    docx = load_file(root / "policy.zh.docx")
    assert docx.title == "退货政策" and [b.headings for b in docx.blocks] == [("退货",), ("退款",)]
    pdf = load_file(root / "manual.zh.pdf")
    assert [b.page for b in pdf.blocks] == [1, 2] and "恢复出厂设置" in pdf.blocks[1].text
    assert load_file(root / "manual.en.pdf").title == "Router manual"
    html = load_file(root / "warranty.zh.html")
    assert html.title == "保修" and "Home" not in html.text and "Copyright" not in html.text  # menus, footer gone
    assert [b.headings for b in html.blocks] == [(), ("索赔",)]
    assert load_file(root / "faq.jsonl").blocks[1].headings == ("固件",)


def test_loader_errors_name_the_file_and_reason(tmp_path):
    (tmp_path / "x.pdf").write_bytes(b"not a pdf")
    with pytest.raises(DataError, match=r"x\.pdf: not a readable PDF"):
        load_file(tmp_path / "x.pdf")
    (tmp_path / "x.docx").write_bytes(b"PK garbage")
    with pytest.raises(DataError, match=r"x\.docx: not a readable \.docx"):
        load_file(tmp_path / "x.docx")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported file type .bin"):
        load_file(tmp_path / "x.bin")
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n[1]\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: expected an object"):
        load_file(tmp_path / "x.jsonl")


def _ref_tokens(text: str) -> int:
    """An independent count: whitespace words, each Han character and each punctuation mark apart."""
    n = 0
    for word in text.split():
        run = ""
        for ch in word:
            if "\u4e00" <= ch <= "\u9fff" or not (ch.isascii() and ch.isalnum()) and ch not in "'’":
                n += bool(run) + 1
                run = ""
            else:
                run += ch
        n += bool(run)
    return n


def test_count_tokens_matches_an_independent_count():
    for text in ["Hold the reset button for ten seconds.", "按住重置按钮十秒钟。", "X200 supports 512 clients; $89.",
                 "mixed 中文 text, 3-5 days！", ""]:
        assert count_tokens(text) == _ref_tokens(text), text


def test_sentences_split_at_english_and_chinese_punctuation():
    text = "It weighs 1.2 kg. Really! 第一句。第二句？第三句；end"
    assert [text[s:e] for s, e in sentence_spans(text)] == ["It weighs 1.2 kg.", "Really!", "第一句。", "第二句？",
                                                            "第三句；", "end"]


def test_chunks_are_token_bounded_with_overlap_offsets_and_sections():
    en = " ".join(f"Sentence number {i} says fact {i} about the router." for i in range(40))
    zh = "".join(f"第{i}条说明路由器的事实。" for i in range(40))
    blocks = [Block(en, ("Setup",)), Block(zh, ("设置",)), Block("Short tail.", ("Setup", "Tail"), 2)]
    doc = "\n\n".join(b.text for b in blocks)
    pieces = chunk_blocks(blocks, chunk_tokens=40, overlap=12)
    assert len(pieces) > 6
    for p in pieces:
        assert doc[p.start:p.end] == p.text and p.tokens == count_tokens(p.text) <= 40
        assert p.text.strip() == p.text
        owner = [i for i, b in enumerate(blocks) if doc.find(b.text) <= p.start < doc.find(b.text) + len(b.text)]
        assert len(owner) == 1 and p.end <= doc.find(blocks[owner[0]].text) + len(blocks[owner[0]].text)  # one section
        assert p.headings == blocks[owner[0]].headings and p.page == blocks[owner[0]].page
    for a, b in zip(pieces, pieces[1:]):
        if a.headings == b.headings:
            assert b.start < a.end and count_tokens(doc[b.start:a.end]) <= 12  # overlap, bounded
            assert b.end > a.end  # progress
    covered = set()
    for p in pieces:
        covered.update(range(p.start, p.end))
    assert all(i in covered for i, ch in enumerate(doc) if not ch.isspace())  # nothing lost
    assert any(p.text.startswith("第") and p.text.endswith("。") for p in pieces)  # Chinese cut at 。


def test_incremental_index_reembeds_only_changed_files_and_drops_deleted(corpus, tmp_path):
    root, facts = corpus
    index, emb = tmp_path / "i.sqlite", HashEmbedder()
    rep = index_documents([root], index, embedder=emb, chunk_tokens=64, overlap=8)
    assert sorted(rep.added) == sorted(facts) and not rep.failed
    first = emb.embedded()
    assert rep.vectors_written == len(first) == rep.chunks_total  # a custom embedder: every language
    r = DocRetriever(index, embedder=emb)
    for source, fact in facts.items():
        hits = r.search(fact, 3, mode="bm25")
        assert hits[0].chunk.source == source, (source, [h.chunk.id for h in hits])
        c = hits[0].chunk
        assert r.document_text(source)[c.start:c.end] == c.text  # offsets point into the extracted text
        assert re.sub(r"\s", "", fact) in re.sub(r"\s", "", c.text)
    r.close()

    emb.calls.clear()
    rep = index_documents([root], index, embedder=emb, chunk_tokens=64, overlap=8)
    assert sorted(rep.unchanged) == sorted(facts) and not rep.added and not rep.updated and emb.calls == []

    (root / "guide.en.md").write_text("# Router guide\n\n## Limits\n\nThe X200 router supports 1024 clients.\n")
    (root / "notes.zh.txt").unlink()
    rep = index_documents([root], index, embedder=emb, chunk_tokens=64, overlap=8)
    assert rep.updated == ["guide.en.md"] and rep.removed == ["notes.zh.txt"] and not rep.added
    assert all("1024" in t or "Router guide" in t for t in emb.embedded())  # only the changed file re-embedded
    r = DocRetriever(index, embedder=emb)
    assert r.search("1024 clients", 1, mode="bm25")[0].chunk.source == "guide.en.md"
    assert not r.search("512 simultaneous", 5, mode="bm25", source="guide.en.md")  # old chunk gone
    con = r.con
    assert con.execute("SELECT count(*) FROM chunks WHERE source = 'notes.zh.txt'").fetchone() == (0,)
    n_chunks = con.execute("SELECT count(*) FROM chunks").fetchone()[0]
    assert con.execute("SELECT count(*) FROM chunks_fts").fetchone()[0] == n_chunks
    assert con.execute("SELECT count(*) FROM dense").fetchone()[0] == n_chunks
    assert con.execute("SELECT count(*) FROM dense WHERE chunk_rowid NOT IN (SELECT rowid FROM chunks)").fetchone() \
        == (0,)
    for mode in ("bm25", "dense", "hybrid"):  # the deleted Chinese file is found by neither BM25 nor vectors
        assert all(h.chunk.source != "notes.zh.txt" for h in r.search("客服热线", 50, mode=mode))


def test_a_broken_file_is_reported_and_the_rest_indexed(corpus, tmp_path):
    root, facts = corpus
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 truncated")
    rep = index_documents([root], tmp_path / "i.sqlite", embedder=None)
    assert [s for s, _ in rep.failed] == ["broken.pdf"] and "not a readable PDF" in rep.failed[0][1]
    assert sorted(rep.added) == sorted(facts)


def test_an_interrupted_run_resumes_after_the_files_it_finished(corpus, tmp_path, monkeypatch):
    import lmstack.rag.index as I

    root, facts = corpus
    real, seen = I.load_file, []

    def flaky(path, source):
        seen.append(source)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(path, source)

    monkeypatch.setattr(I, "load_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        index_documents([root], tmp_path / "i.sqlite", embedder=None)
    monkeypatch.setattr(I, "load_file", real)
    rep = index_documents([root], tmp_path / "i.sqlite", embedder=None)
    assert rep.unchanged == seen[:3] and sorted(rep.added) == sorted(set(facts) - set(seen[:3]))


def test_filters_and_modes(corpus, tmp_path):
    root, _ = corpus
    index_documents([root], tmp_path / "i.sqlite", embedder=HashEmbedder())
    r = DocRetriever(tmp_path / "i.sqlite", embedder=HashEmbedder())
    assert {h.chunk.source for h in r.search("router", 10, source="*.pdf")} <= {"manual.en.pdf", "manual.zh.pdf"}
    assert all(h.chunk.lang == "zh" for h in r.search("路由器 router", 10, lang="zh"))
    dense = r.search("reset button ten seconds", 3, mode="dense")
    assert dense and dense[0].chunk.source == "manual.en.pdf"
    assert [h.rank for h in dense] == [1, 2, 3]
    assert r.search("reset button", 3)[0].chunk.source == "manual.en.pdf"  # hybrid


def test_jieba_analyzer_indexes_chinese_words(corpus, tmp_path):
    pytest.importorskip("jieba")
    from lmstack.rag.analyze import terms

    assert "路由器" in terms("路由器最多支持", han="jieba") and "路由器" not in terms("路由器最多支持")
    root, facts = corpus
    index_documents([root], tmp_path / "j.sqlite", embedder=None, han="jieba")
    r = DocRetriever(tmp_path / "j.sqlite")
    assert r.han == "jieba" and r.search("怎么恢复出厂设置", 1)[0].chunk.source == "manual.zh.pdf"


def test_ranking_metrics_match_sklearn_and_hand_formulas():
    from sklearn.metrics import ndcg_score

    from lmstack.rag.evaluate import ranking_metrics

    rng = np.random.default_rng(0)
    rels, n_rel = [], []
    yt, ys = [], []
    for _ in range(30):
        n_items = 12
        truth = (rng.random(n_items) < 0.25).astype(float)
        order = rng.permutation(n_items)[:8]  # the retriever's top 8
        rels.append([bool(truth[i]) for i in order])
        n_rel.append(int(truth.sum()))
        score = np.full(n_items, -1.0)
        score[order] = np.arange(8, 0, -1)  # unranked items below every ranked one
        yt.append(truth)
        ys.append(score)
    m = ranking_metrics(rels, n_rel, [1, 3, 5])
    for k in (1, 3, 5):
        ok = [i for i in range(30) if n_rel[i] > 0]  # sklearn scores a question without relevant items as 0 too
        ref = sum(ndcg_score([yt[i]], [ys[i]], k=k) for i in ok) / 30
        assert m[f"ndcg@{k}"] == pytest.approx(ref, abs=1e-9)
        assert m[f"recall@{k}"] == pytest.approx(np.mean([any(r[:k]) for r in rels]))
        ref_mrr = np.mean([next((1 / (j + 1) for j, x in enumerate(r[:k]) if x), 0.0) for r in rels])
        assert m[f"mrr@{k}"] == pytest.approx(ref_mrr)


def test_citations_point_at_the_chunk_with_the_quoted_fact(corpus, tmp_path):
    """A model that quotes the sentence holding the fact and cites the number the prompt gave it: the returned
    source with that number contains the fact, at its offsets in the document."""
    from lmstack.rag.answer import ask, citations

    root, facts = corpus
    index_documents([root], tmp_path / "i.sqlite", embedder=None, chunk_tokens=32, overlap=4)
    r = DocRetriever(tmp_path / "i.sqlite")

    class QuotingLLM:
        def __init__(self, fact):
            self.fact = fact

        def chat(self, messages, **kw):
            system = messages[0]["content"]
            blocks = re.findall(r"^\[(\d+)\] \((.*?)\) (.*?)(?=\n\n\[\d+\]|\Z)", system, re.M | re.S)
            n = next(int(num) for num, _, text in blocks if self.fact in text)
            out = type("O", (), {"text": f"{self.fact} [{n}]"})
            return type("R", (), {"outputs": [out]})

    for question, fact in [("How many clients does the X200 support?", EN_FACT),
                           ("X200最多支持多少设备？", ZH_FACT),
                           ("how to restore defaults", facts["manual.en.pdf"])]:
        out = ask(QuotingLLM(fact), r, question, k=5, mode="bm25")
        cited = [s for s in out["sources"] if s["cited"]]
        assert len(cited) == 1 and citations(out["answer"], 5) == [cited[0]["n"]]
        assert fact in cited[0]["text"]
        assert fact in r.document_text(cited[0]["source"])[cited[0]["start"]:cited[0]["end"]]


def test_faithfulness_counts_supported_sentences():
    from lmstack.rag.answer import citations, faithfulness, groundedness
    from lmstack.rag.chunk import Chunk
    from lmstack.rag.store import Hit

    hits = [Hit(Chunk("a#0", "a", "Standard shipping takes 3-5 business days."), 1.0, 1),
            Hit(Chunk("b#0", "b", "Returns are free within 30 days."), 0.5, 2)]
    assert citations("x [2] y [1, 2] z [7] [０]", 2) == [2, 1]
    assert faithfulness("Shipping takes 3-5 business days [1].", hits) == 1.0
    # the second sentence cites [1], which says nothing about returns: 1 of 2 supported
    assert faithfulness("Shipping takes 3-5 business days [1]. Returns are free within 30 days [1].", hits) == 0.5
    assert faithfulness("Returns are free within 30 days [2]. Here it is!", hits) == 1.0  # no terms: skipped
    assert faithfulness("Nothing cited here about shipping.", hits) == 0.0
    assert faithfulness("", hits) is None
    # groundedness ignores citations: any shown chunk may support a sentence
    assert groundedness("Nothing cited here about shipping.", hits) == 0.0  # 1 of 3 terms in a chunk
    assert groundedness("Shipping takes 3-5 business days. Returns are free within 30 days [1].", hits) == 1.0
    assert groundedness("Shipping takes 3-5 business days. Gift wrapping costs nothing on Sundays.", hits) == 0.5
    assert groundedness("Here it is!", hits) is None


def test_large_index_smoke_and_ann_recall(tmp_path):
    """The 100k-chunk path at reduced size: 2,000 CSV rows indexed and queried; usearch's HNSW against exact search
    on 4,000 random unit vectors."""
    rows = "\n".join(f"item{i},widget {i} made of {['oak', 'steel', 'glass'][i % 3]},{i % 97}" for i in range(2000))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "items.csv").write_text("sku,name,price\n" + rows + "\n")
    rep = index_documents([tmp_path / "d"], tmp_path / "i.sqlite", embedder=None, chunk_tokens=16, overlap=0)
    assert rep.chunks_total >= 2000 // 2
    hits = DocRetriever(tmp_path / "i.sqlite").search("item1718 glass", 3)
    assert "item1718" in hits[0].chunk.text

    pytest.importorskip("usearch")
    from lmstack.rag.vectors import ExactStore, USearchStore, make_store

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(4000) * 3 + 1
    exact, ann = ExactStore(ids, vecs), USearchStore(ids, vecs)
    assert isinstance(make_store(ids, vecs, ann_above=3999), USearchStore)
    assert isinstance(make_store(ids, vecs), ExactStore)
    qs = rng.standard_normal((50, 32)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    overlap = []
    for q in qs:
        ref = np.argsort(-(vecs @ q), kind="stable")[:10]  # brute force, independent of ExactStore
        got = exact.search(q, 10)
        assert [i for i, _ in got] == [int(ids[j]) for j in ref]
        assert [s for _, s in got] == pytest.approx([float(vecs[j] @ q) for j in ref], abs=1e-5)
        overlap.append(len({i for i, _ in ann.search(q, 10)} & {int(ids[j]) for j in ref}) / 10)
    assert np.mean(overlap) >= 0.9


def test_cli_index_search_and_one_line_errors(corpus, tmp_path, capsys):
    from lmstack.cli import main

    root, _ = corpus
    (root / "broken.docx").write_bytes(b"nope")
    assert main(["rag", "index", "--docs", str(root), "--index", str(tmp_path / "i.sqlite"), "--embedder", "none",
                 "--chunk-tokens", "64"]) == 0
    out = capsys.readouterr()
    assert "failed 1" in out.out and "skipped broken.docx" in out.err
    assert main(["rag", "search", "reset button", "--index", str(tmp_path / "i.sqlite"), "--mode", "bm25"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["source"] == "manual.en.pdf"
    for argv, msg in [(["rag", "search", "x", "--index", str(tmp_path / "none.sqlite")], "index not found"),
                      (["rag", "index", "--docs", str(tmp_path / "nowhere"), "--index", str(tmp_path / "j.sqlite")],
                       "no such file or directory"),
                      (["rag", "eval", "--index", str(tmp_path / "i.sqlite"), "-q", str(root / "notes.en.txt")],
                       "not valid JSON")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "support.sqlite").write_bytes(b"")
    from lmstack.rag import build_index
    from lmstack.rag.chunk import Chunk

    build_index([Chunk("a#0", "a", "text")], tmp_path / "support.sqlite")
    assert main(["rag", "index", "--docs", str(root), "--index", str(tmp_path / "support.sqlite")]) == 2
    assert "not an lmstack document index" in capsys.readouterr().err


def test_every_vector_store_gives_the_same_results(corpus, tmp_path):
    """Exact numpy, usearch (HNSW; exact at this size) and Qdrant's local mode: the same dense and hybrid rankings
    through DocRetriever on the same index."""
    pytest.importorskip("usearch")
    pytest.importorskip("qdrant_client")
    root, facts = corpus
    emb = HashEmbedder(noise=0.05)
    index_documents([root], tmp_path / "i.sqlite", embedder=emb, chunk_tokens=32, overlap=4)
    stores = {kind: DocRetriever(tmp_path / "i.sqlite", embedder=emb, store=kind)
              for kind in ("exact", "usearch", "qdrant")}
    assert type(stores["qdrant"].vectors).__name__ == "QdrantStore"
    for q in ["reset button", "two-year warranty", "退款 银行卡", "firmware 3 am"]:
        for mode in ("dense", "hybrid"):
            runs = {kind: [(h.chunk.id, round(h.score, 5)) for h in r.search(q, 5, mode=mode)]
                    for kind, r in stores.items()}
            assert runs["exact"] == runs["usearch"] == runs["qdrant"], (q, mode, runs)
    with pytest.raises(Exception, match="vector store must be one of"):
        DocRetriever(tmp_path / "i.sqlite", embedder=emb, store="faiss")
