"""Issue 23's remaining pieces: the support app's index on the general document index (same rankings and scores
as the older whole-file index), second-stage reranking in DocRetriever, the bilingual embedder's loss (vs
sentence-transformers' MultipleNegativesRankingLoss), its vocabulary extension and training data (no leakage of
held-out questions), and answer EM/F1 in `rag eval`."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lmstack.rag import Chunk, Retriever, build_index
from lmstack.rag.analyze import terms
from lmstack.rag.index import DocRetriever, index_chunks, open_retriever

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "recipes" / "data" / "rag_eval"


class HashEmbedder:
    """Normalised hashed bag of analysed terms (a deterministic stand-in for sentence-transformers)."""

    lmstack_name = "hash"

    def encode(self, texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True):
        out = np.zeros((len(texts), 256), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in terms(t):
                out[i, zlib.crc32(w.encode()) % 256] += 1.0
            out[i] /= np.linalg.norm(out[i]) or 1.0
        return out


# ------------------------------------------------------------------------------ support on the general index
def test_support_index_on_the_document_index_ranks_and_scores_as_before(kb, tmp_path):
    """The shop's chunks (FAQ keywords searchable and embedded as extra views) through index_chunks +
    DocRetriever give the same hits and scores as build_index + add_embeddings + Retriever."""
    from lmstack.apps.support import qa_items
    from lmstack.apps.support.retrieval import (KB_CANDIDATES, build_kb_index, context_hits, kb_chunks,
                                                open_kb_retriever)
    from lmstack.rag.dense import add_embeddings

    emb = HashEmbedder()
    old, new = tmp_path / "old.sqlite", tmp_path / "new.sqlite"
    build_index(kb_chunks(kb, faq_keywords=True), old)
    add_embeddings(old, emb, name="hash", langs=["en"])
    stats = build_kb_index(kb, new, faq_keywords=True, embedder=emb, dense_langs=["en"])
    assert stats["dense_views"] > 1 and stats["vectors"] > stats["chunks"] / 2
    items = qa_items(kb)
    questions = [it.heldout_question for it in items][::3] + ["And express?", "你好"]
    for dense in (None, emb):
        ro = Retriever(old, embedder=dense)
        rn = open_kb_retriever(new, embedder=dense)
        assert isinstance(rn, DocRetriever) and rn.CANDIDATES == KB_CANDIDATES
        for q in questions:
            a = [(h.chunk.id, round(h.score, 9)) for h in context_hits(ro, q, k=5)]
            b = [(h.chunk.id, round(h.score, 9)) for h in context_hits(rn, q, k=5)]
            assert a == b, q
        assert rn.get("faq/ship-free.en").keywords == ro.get("faq/ship-free.en").keywords
        assert rn.get("nope") is None
    # an index in the older format still opens (bundles written before the move)
    assert isinstance(open_kb_retriever(old, embedder=None), Retriever)


# ------------------------------------------------------------------------------------------------ reranking
CORPUS = [("a.md", "Returns", "You can return any item within 30 days for a full refund."),
          ("b.md", "Shipping", "Standard shipping takes 3-5 business days. Express takes 1-2 days."),
          ("c.md", "Warranty", "Every product has a one-year warranty against defects."),
          ("d.md", "Returns abroad", "International returns: ship the item back within 30 days at your cost.")]


def _doc_index(tmp_path, embedder=None):
    chunks = [Chunk(id=f"{s}#0", doc_id=s, text=t, title=title, lang="en", source=s) for s, title, t in CORPUS]
    path = tmp_path / "docs.sqlite"
    index_chunks(chunks, path, embedder=embedder, dense_langs=None)
    return path


def test_feature_reranker_reorders_by_its_weights(tmp_path):
    from lmstack.rag.rerank import LinearRanker
    from lmstack.rag.rerankers import FeatureReranker, candidate_features

    path = _doc_index(tmp_path, HashEmbedder())
    base = DocRetriever(path, embedder=HashEmbedder())
    q = "return an item from abroad"
    first = base.search(q, 4, mode="bm25")
    rows = candidate_features(q, first, base)
    # the features, by hand: overlap = share of the query's terms in the chunk; bm25 relative to the best
    want_terms = set(terms(q))
    for h, r in zip(first, rows):
        have = set(terms(f"{h.chunk.title}\n{h.chunk.text}"))
        assert r["overlap"] == pytest.approx(len(have & want_terms) / len(want_terms))
        assert r["bm25"] == pytest.approx(h.score / first[0].score)
        qv, cv = HashEmbedder().encode([q])[0], HashEmbedder().encode([f"{h.chunk.text}"])[0]
        assert r["dense"] == pytest.approx(max(float(qv @ cv), 0.0), abs=1e-6)
        assert r["zh_bm25"] == 0.0
    # a reranker that trusts only the title overlap puts "Returns abroad" first, whatever BM25 said
    rr = FeatureReranker(LinearRanker({"title": 1.0, "first": 0.01}))
    r = DocRetriever(path, embedder=HashEmbedder(), reranker=rr, rerank_depth=4)
    hits = r.search(q, 2, mode="bm25")
    assert [h.chunk.id for h in hits] == ["d.md#0", "a.md#0"] and [h.rank for h in hits] == [1, 2]
    assert hits[0].score == pytest.approx(1.0 * rows[[h.chunk.id for h in first].index("d.md#0")]["title"] + 0.01 / (
        [h.chunk.id for h in first].index("d.md#0") + 1))
    assert [h.chunk.id for h in r.search(q, 4, mode="bm25", rerank=False)] == [h.chunk.id for h in first]


def test_fit_reranker_and_cli_rerank(tmp_path, capsys):
    """fit-reranker learns weights that put the labelled chunk first on its training questions; --rerank loads
    them; a bad --rerank is one line, exit 2."""
    from typer.testing import CliRunner

    from lmstack.cli import app

    path = _doc_index(tmp_path)
    qs = tmp_path / "q.jsonl"
    rows = [{"question": "refund after thirty days", "relevant": [{"source": "a.md"}]},
            {"question": "how long does delivery take", "relevant": [{"source": "b.md"}]},
            {"question": "defect warranty", "relevant": [{"source": "c.md"}]},
            {"question": "returns from abroad", "relevant": [{"source": "d.md"}]}]
    qs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    out = tmp_path / "rr.json"
    res = runner.invoke(app, ["rag", "fit-reranker", "-i", str(path), "-q", str(qs), "-o", str(out), "--mode", "bm25"])
    assert res.exit_code == 0, res.output
    info = json.loads(out.read_text())
    assert info["info"]["questions"] >= 3 and info["info"]["accuracy"] >= 0.75
    res = runner.invoke(app, ["rag", "search", "returns from abroad", "-i", str(path), "--mode", "bm25",
                              "--rerank", str(out), "--k", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["source"] == "d.md"
    from lmstack.rag.server import rag_wrap

    wrap = rag_wrap(path, rerank=out)  # lmstack serve --rag INDEX --rag-rerank rr.json
    assert wrap.retriever.reranker.kind == "features"
    assert wrap.retriever.search("returns from abroad", 1)[0].chunk.source == "d.md"
    from lmstack.cli import main

    capsys.readouterr()
    assert main(["rag", "search", "x", "-i", str(path), "--rerank", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rerank" in err and "Traceback" not in err


def test_cross_encoder_reranker_orders_by_the_models_own_scores(tmp_path):
    """A tiny random CrossEncoder directory: the reranked order is the order of CrossEncoder.predict's scores."""
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from lmstack.rag.rerankers import load_reranker

    d = tmp_path / "ce"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for _, ti, t in CORPUS for w in
                                                                      (ti + " " + t).lower().replace(".", " ").replace(":", " ").split()})
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(d)
    path = _doc_index(tmp_path)
    r = DocRetriever(path, embedder=None, reranker=load_reranker(d), rerank_depth=4)
    q = "return within 30 days"
    first = r.search(q, 4, mode="bm25", rerank=False)
    ref = CrossEncoder(str(d), device="cpu").predict([(q, f"{h.chunk.title}\n{h.chunk.text}") for h in first])
    want = [first[i].chunk.id for i in sorted(range(len(first)), key=lambda i: (-float(ref[i]), i))]
    got = r.search(q, 4, mode="bm25")
    assert [h.chunk.id for h in got] == want
    assert [h.score for h in got] == pytest.approx(sorted((float(x) for x in ref), reverse=True), abs=1e-5)


# ------------------------------------------------------------------------------------------ bilingual embedder
def test_info_nce_matches_sentence_transformers_mnrl():
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from lmstack.rag.embedder import info_nce

    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(6, 16, generator=g) for _ in range(3))
    mnrl = MultipleNegativesRankingLoss(torch.nn.Identity())  # default: scale 20, cosine, query_to_doc
    labels = torch.zeros(6)
    torch.testing.assert_close(info_nce(a, p), mnrl.compute_loss_from_embeddings([a, p], labels))
    torch.testing.assert_close(info_nce(a, torch.cat([p, n])), mnrl.compute_loss_from_embeddings([a, p, n], labels))
    # and the formula on two pairs, by hand
    a2, p2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    s = 20 * torch.tensor([[2 ** -0.5, 0.0], [2 ** -0.5, 1.0]])
    want = -(torch.log_softmax(s, 1)[0, 0] + torch.log_softmax(s, 1)[1, 1]) / 2
    torch.testing.assert_close(info_nce(a2, p2), want)


def test_training_data_never_holds_a_heldout_question():
    heldout = [json.loads(line)["question"] for line in open(EVAL / "questions.jsonl", encoding="utf-8")]
    train_q = [json.loads(line) for line in open(EVAL / "train_questions.jsonl", encoding="utf-8")]
    pairs = [json.loads(line) for line in open(EVAL / "parallel.jsonl", encoding="utf-8")]
    texts = [q["question"] for q in train_q] + [t for p in pairs for t in (p["anchor"], p["positive"])]
    blob = "\n".join(texts)
    squeeze = (lambda s: "".join(s.split()).lower())
    for q in heldout:
        assert q not in blob and squeeze(q) not in squeeze(blob), q
    assert len(train_q) >= 200 and sum(p["kind"] == "translation" for p in pairs) >= 300


def test_batches_never_pair_a_positive_with_itself():
    import random

    from lmstack.rag.embedder import _batches

    pairs = [{"anchor": f"q{i}", "positive": f"p{i % 5}"} for i in range(40)]
    batches = _batches(pairs, 4, random.Random(0))
    for b in batches:
        assert len({p["positive"] for p in b}) == len(b) and len(b) <= 4
    assert sum(len(b) for b in batches) >= 35


# ------------------------------------------------------------------------------------------- answer EM / F1
def test_answer_metrics_em_f1_against_the_gold_answer(tmp_path):
    from lmstack.eval.metrics import token_f1
    from lmstack.rag.evaluate import answer_metrics

    path = _doc_index(tmp_path)
    r = DocRetriever(path, embedder=None)
    qs = [{"question": "How long is standard shipping?", "relevant": [{"source": "b.md", "contains":
                                                                        "Standard shipping takes 3-5 business days."}]},
          {"question": "Refund window?", "answer": "30 days", "relevant": [{"source": "a.md"}]}]
    hits = [r.search(q["question"], 2, mode="bm25") for q in qs]
    replies = ["Standard shipping takes 3-5 business days. [1]", "Within 30 days you get a refund [1]."]

    class FakeLLM:
        def chat_prompt(self, messages):
            return messages[-1]["content"]

        def generate(self, prompts, **kw):
            return [SimpleNamespace(outputs=[SimpleNamespace(text=replies[[q["question"] for q in qs].index(p)])])
                    for p in prompts]

    rep = answer_metrics(FakeLLM(), qs, hits)
    assert rep["answers"][0]["exact_match"] == 1.0 and rep["answers"][1]["exact_match"] == 0.0
    assert rep["answers"][1]["f1"] == pytest.approx(token_f1("Within 30 days you get a refund .", "30 days"))
    assert rep["answers"][1]["contains"] == 1.0
    assert rep["exact_match"] == 0.5 and rep["citation_accuracy"] == 1.0


def test_open_retriever_refuses_junk_in_one_line(tmp_path):
    from lmstack.errors import DataError

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 10)
    with pytest.raises(DataError, match="not an lmstack document index"):
        open_retriever(junk)
