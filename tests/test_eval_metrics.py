"""Metrics against the reference libraries and published formulas on fixed inputs."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

from lmstack.eval import metrics as M

HYPS = ["the cat sat on the mat", "a quick brown fox jumped", "hello there general kenobi"]
REFS = [["the cat is on the mat", "there is a cat on the mat"],
        ["the quick brown fox jumps", "a fast brown fox leaps"],
        ["hello there general kenobi", "hi general kenobi"]]


def test_bleu_and_chrf_equal_sacrebleu_with_multiple_references():
    streams = [[r[0] for r in REFS], [r[1] for r in REFS]]
    assert M.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score, abs=1e-9)
    assert M.chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score, abs=1e-9)
    assert M.bleu(["same words here exactly"], ["same words here exactly"]) == pytest.approx(100.0)


def test_bleu_uses_zh_tokenizer_for_chinese_references():
    hyps, refs = ["我爱北京天安门"], ["我爱北京天安门广场"]
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score
    assert M.bleu(hyps, refs) == pytest.approx(expected)
    assert expected != sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score  # the choice matters


def test_rouge_equals_rouge_score_on_english():
    ref_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    ours = M.rouge([h for h in HYPS], [r[0] for r in REFS])
    for t in ("rouge1", "rouge2", "rougeL"):
        expected = sum(ref_scorer.score(r[0], h)[t].fmeasure for h, r in zip(HYPS, REFS)) / len(HYPS)
        assert ours[t] == pytest.approx(expected)
    multi = M.rouge(HYPS[:1], REFS[:1], ["rougeL"])["rougeL"]
    assert multi == pytest.approx(ref_scorer.score_multi(REFS[0], HYPS[0])["rougeL"].fmeasure)


def test_rouge_on_chinese_by_hand():
    # pred 7 chars, ref 4 chars, all 4 ref chars in order in pred:
    # R1: P=4/7, R=1 -> F=8/11; R2: 3 of 6 pred bigrams -> P=1/2, R=1 -> F=2/3; RL: LCS 4 -> 8/11
    r = M.rouge(["我爱北京天安门"], ["我爱北京"])
    assert r["rouge1"] == pytest.approx(8 / 11)
    assert r["rouge2"] == pytest.approx(2 / 3)
    assert r["rougeL"] == pytest.approx(8 / 11)
    # the library's default tokenizer drops CJK entirely (why we pass our own)
    assert rouge_scorer.RougeScorer(["rouge1"]).score("我爱北京", "我爱北京天安门")["rouge1"].fmeasure == 0.0


def test_exact_match_and_token_f1_squad_rules():
    assert M.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert M.exact_match("Paris, France", ["London", "paris france"]) == 1.0
    assert M.exact_match("Paris", "Lyon") == 0.0
    assert M.token_f1("big red apple", "red apple pie") == pytest.approx(2 / 3)  # P=R=2/3
    assert M.token_f1("北京市", "北京") == pytest.approx(0.8)  # P=2/3, R=1
    assert M.token_f1("nothing", ["a b", "nothing at all"]) == pytest.approx(0.5)  # P=1, R=1/3
    assert M.token_f1("", "") == 1.0


def test_pass_at_k_matches_the_estimator_on_hand_made_counts():
    def formula(n, c, k):  # Chen et al. 2021, eq. 1
        return 1.0 - math.comb(n - c, k) / math.comb(n, k)

    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 1, 10), (5, 5, 3), (7, 0, 2), (200, 13, 100)]:
        assert M.pass_at_k(n, c, k) == pytest.approx(formula(n, c, k), abs=1e-12)
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert M.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert M.mean_pass_at_k([(4, 1), (4, 0)], 1) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="at least 5"):
        M.pass_at_k(3, 1, 5)


def test_accuracy_and_macro_f1_equal_sklearn():
    gold = ["billing", "refund", "refund", "account", "billing", "shipping", "account"]
    pred = ["billing", "refund", "billing", "account", "shipping", "shipping", "refund"]
    labels = ["account", "billing", "refund", "shipping", "technical"]
    assert M.accuracy(pred, gold) == pytest.approx(4 / 7)
    assert M.macro_f1(pred, gold, labels) == pytest.approx(
        f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
    assert M.macro_f1(pred, gold) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))


def test_contains_finds_the_answer_as_a_run_of_whole_tokens():
    from lmstack.eval.metrics import contains

    assert contains("The capital of France is Paris.", ["Paris"]) == 1.0
    assert contains("A week has 7 days.", ["7", "seven"]) == 1.0
    assert contains("It lasts 17 days.", ["7", "seven"]) == 0.0  # a token, not a substring
    assert contains("法国的首都是巴黎。", ["巴黎", "Paris"]) == 1.0  # CJK: one token per character
    assert contains("法国的首都是黎巴嫩", ["巴黎"]) == 0.0  # the characters, in order, next to each other
    assert contains("Carbon dioxide, mostly.", ["carbon dioxide"]) == 1.0
    assert contains("", ["Paris"]) == 0.0


def test_generation_filters_remove_citations_before_scoring():
    import pytest

    from lmstack.eval.generation import apply_filters, score_generation
    from lmstack.eval.task import GenerationTask

    cite = r"\s*(?:\[\d{1,2}\])+\s*$"
    preds = [apply_filters(p, [cite]) for p in ["Standard shipping is free. [2]", "It costs $5. [1][3] ", "No [cite]"]]
    assert preds == ["Standard shipping is free.", "It costs $5.", "No [cite]"]
    m = score_generation(preds, [["Standard shipping is free."], ["It costs $5."], ["No"]], ["exact_match"])
    assert m["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not a regular expression"):
        GenerationTask(type="generation", data="x.jsonl", remove=["[unclosed"])
