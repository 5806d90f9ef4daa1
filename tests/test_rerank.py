"""The learned answer ranker (lmstack.rag.rerank) and the support reader's features (lmstack.apps.support.reader)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest


def _listwise_loss(w: np.ndarray, groups, feats, l2: float) -> float:
    """The published ListNet top-one loss with a one-hot (or multi-gold) target, written out in numpy."""
    total = 0.0
    for rows, gold in groups:
        s = np.array([sum(w[j] * r.get(f, 0.0) for j, f in enumerate(feats)) for r in rows])
        m = s.max()
        total += (m + math.log(np.exp(s - m).sum())) - (m + math.log(np.exp(s[gold] - m).sum()))
    return total / len(groups) + l2 * float(w @ w)


def _synthetic(n: int, true_w: dict[str, float], seed: int = 0):
    """Questions whose gold candidate is drawn from softmax(true_w . x) over 6 candidates."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        rows = [{"a": rng.gauss(0, 1), "b": rng.random(), "c": float(rng.random() < 0.3)} for _ in range(6)]
        s = np.array([sum(true_w[k] * r[k] for k in true_w) for r in rows])
        p = np.exp(s - s.max())
        p /= p.sum()
        groups.append((rows, [int(np.searchsorted(np.cumsum(p), rng.random()))]))
    return groups


def test_fit_minimises_the_listwise_loss_and_recovers_the_weights():
    from lmstack.rag.rerank import LinearRanker

    true_w = {"a": 2.0, "b": -3.0, "c": 1.0}
    groups = _synthetic(400, true_w)
    feats = ["a", "b", "c"]
    r = LinearRanker.fit(groups, feats, l2=1e-3)
    w = np.array([r.weights[f] for f in feats])
    # the reported loss is the formula's value at the fitted weights
    assert r.info["loss"] == pytest.approx(_listwise_loss(w, groups, feats, 1e-3), rel=1e-9)
    # and a minimum: no coordinate step lowers it (the problem is convex)
    for j in range(3):
        for eps in (1e-3, -1e-3):
            w2 = w.copy()
            w2[j] += eps
            assert _listwise_loss(w2, groups, feats, 1e-3) >= r.info["loss"] - 1e-9
    # maximum likelihood recovers the generating weights (400 questions x 6 candidates)
    for f in feats:
        assert r.weights[f] == pytest.approx(true_w[f], abs=0.6)
    assert r.info["questions"] == 400 and 0.3 < r.info["accuracy"] <= 1.0


def test_fit_skips_questions_without_a_gold_candidate_and_refuses_none():
    from lmstack.errors import DataError
    from lmstack.rag.rerank import LinearRanker

    groups = _synthetic(50, {"a": 1.0, "b": 0.0, "c": 0.0})
    r = LinearRanker.fit(groups + [([{"a": 1.0}], [])], ["a"])
    assert r.info["questions"] == 50 and r.info["skipped_no_gold"] == 1
    with pytest.raises(DataError, match="no question"):
        LinearRanker.fit([([{"a": 1.0}], [])], ["a"])


def test_a_feature_constant_within_every_question_keeps_zero_weight():
    from lmstack.rag.rerank import LinearRanker

    groups = [([{**r, "const": 5.0} for r in rows], g) for rows, g in _synthetic(100, {"a": 1.5, "b": 0, "c": 0})]
    r = LinearRanker.fit(groups, ["a", "const"], l2=1e-3)
    assert abs(r.weights["const"]) < 1e-6 and r.weights["a"] > 0.5


def test_scores_best_and_files(tmp_path):
    from lmstack.errors import DataError
    from lmstack.rag.rerank import LinearRanker

    r = LinearRanker({"lm": 0.5, "overlap": 2.0}, {"dev_questions": 3})
    rows = [{"lm": -2.0, "overlap": 0.0}, {"lm": -3.0, "overlap": 1.0}, {"lm": -1.0}]
    assert r.scores(rows) == [-1.0, 0.5, -0.5] and r.order(rows) == [(1, 0.5), (2, -0.5), (0, -1.0)]
    assert r.order([]) == []
    assert r.order([{"lm": 1.0}, {"lm": 1.0}])[0][0] == 0  # ties: the earlier candidate (the better-ranked passage)
    p = tmp_path / "ranker.json"
    r.save(p)
    back = LinearRanker.load(p)
    assert back.weights == r.weights and back.info == r.info and not list(tmp_path.glob("*.tmp*"))
    for text, msg in (("{", "not a ranker file"), (json.dumps({"format": 9, "weights": {}}), "format 1"),
                      (json.dumps({"format": 1, "weights": {"lm": "x"}}), "numbers")):
        p.write_text(text)
        with pytest.raises(DataError, match=msg):
            LinearRanker.load(p)
    with pytest.raises(DataError, match="not found"):
        LinearRanker.load(tmp_path / "missing.json")


class _Chunk:
    def __init__(self, id, text):
        self.id, self.text = id, text


class _Hit:
    def __init__(self, chunk, rank):
        self.chunk, self.rank, self.score = chunk, rank, 1.0


class _Embedder:
    """Bag-of-letters vectors: a deterministic stand-in for a sentence embedder."""

    def __init__(self):
        self.calls = 0

    def encode(self, texts, **kw):
        self.calls += 1
        out = np.zeros((len(texts), 26), np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _hits():
    return [_Hit(_Chunk("product/LH-K01.en", "Cedar Cutting Board (LH-K01): a board.\nThe Cedar Cutting Board costs "
                        "$34. The Cedar Cutting Board weighs 1.2 kg."), 1),
            _Hit(_Chunk("faq/ship-free.en", "Q: Is shipping free?\nA: Standard shipping is free over $50."), 2)]


def test_reader_features_without_a_model():
    from lmstack.apps.support.dialogues import GREETINGS, OUT_OF_SCOPE
    from lmstack.apps.support.reader import Reader, candidate_set
    from lmstack.rag import terms
    from lmstack.rag.rerank import LinearRanker

    cands = candidate_set(_hits(), "en")
    assert [(c.text, c.rank) for c in cands] == [
        ("The Cedar Cutting Board costs $34.", 1), ("The Cedar Cutting Board weighs 1.2 kg.", 1),
        ("Standard shipping is free over $50.", 2), (GREETINGS["en"][1], 0), (OUT_OF_SCOPE["en"][1], 0)]
    emb = _Embedder()
    reader = Reader(None, LinearRanker({"overlap": 1.0, "dense": 1.0, "reply": -5.0}), emb, ["en"])
    q = "How heavy is the cedar cutting board, what does it weigh?"
    rows = reader.features("", q, cands)
    qt = set(terms(q))
    for c, r in zip(cands, rows):
        assert r["overlap"] == pytest.approx(len(qt & set(terms(c.text))) / len(qt))
        v = emb.encode([q, c.text])
        assert r["dense"] == pytest.approx(float(v[0] @ v[1]), abs=1e-6)
        assert r["reply"] == float(c.rank == 0) and r["rank2"] == float(c.rank == 2) and "lm" not in r
    assert reader.answer("", q, _hits()) == "The Cedar Cutting Board weighs 1.2 kg."
    calls = emb.calls
    reader.features("", q, cands)
    assert emb.calls == calls  # question and candidates embedded once, then cached
    # a language the embedder does not read: the dense feature is 0 for every candidate
    assert {r["dense"] for r in reader.features("", "雪松砧板多重？", cands)} == {0.0}
    with pytest.raises(ValueError, match="give the Reader a model"):
        Reader(None, LinearRanker({"lm": 1.0}))


def test_reader_load_drops_the_dense_feature_when_the_embedder_is_missing(tmp_path, monkeypatch):
    import lmstack.rag.dense as dense
    from lmstack.apps.support.reader import Reader
    from lmstack.errors import ConfigError
    from lmstack.rag.rerank import LinearRanker

    def missing(name, device="cpu"):
        raise ConfigError("the embedder x is not installed: pip install 'lmstack[rag]'")

    monkeypatch.setattr(dense, "load_embedder", missing)
    path = tmp_path / "r.json"
    LinearRanker({"overlap": 1.0, "dense": 3.0}, {"embedder": "x"}).save(path)
    with pytest.warns(UserWarning, match="without that feature"):
        reader = Reader.load(None, ranker=path)
    assert reader.ranker.weights == {"overlap": 1.0} and reader.lm is None
    with pytest.raises(ValueError, match="model directory"):
        Reader.load(None, ranker=LinearRanker({"lm": 1.0}))


def test_group_weights_equal_repeating_questions():
    from lmstack.rag.rerank import LinearRanker

    groups = _synthetic(60, {"a": 1.0, "b": -1.0, "c": 2.0}, seed=3)
    twice = groups[:20] + groups[:20] + groups[20:]
    a = LinearRanker.fit(groups, ["a", "b", "c"], group_weights=[2.0] * 20 + [1.0] * 40)
    b = LinearRanker.fit(twice, ["a", "b", "c"])
    for f in "abc":
        assert a.weights[f] == pytest.approx(b.weights[f], abs=1e-5)
    assert a.info["accuracy"] == pytest.approx(b.info["accuracy"])
    with pytest.raises(ValueError, match="group weights"):
        LinearRanker.fit(groups, ["a"], group_weights=[1.0])
