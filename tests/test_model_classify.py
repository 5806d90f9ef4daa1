"""`lmstack classify`: metrics against scikit-learn, a classifier trained on the shipped EN+ZH intent set whose
directory transformers loads with the same predictions (and whose reported accuracy / macro-F1 are recomputed
here from transformers' predictions), and one-line errors for bad data."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from lmstack.errors import DataError
from lmstack.model.classify import (
    SHIPPED_INTENTS, ClassifyConfig, Classifier, accuracy, macro_f1, read_labelled, train_classifier,
)


def test_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    labels = ["a", "b", "c", "d"]
    for _ in range(20):
        gold = [rng.choice(labels[:3]) for _ in range(30)]  # "d" is never gold: its F1 is 0 when predicted
        pred = [rng.choice(labels) for _ in range(30)]
        assert accuracy(gold, pred) == pytest.approx(accuracy_score(gold, pred))
        assert macro_f1(gold, pred, labels) == pytest.approx(
            f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
        assert macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))


def test_shipped_intents_are_balanced_en_and_zh():
    rows = read_labelled(SHIPPED_INTENTS)
    per = {(r["label"], r["lang"], r["split"]) for r in rows}
    assert {r["lang"] for r in rows} == {"en", "zh"} and len({r["label"] for r in rows}) == 5
    assert len(per) == 5 * 2 * 2 and len({r["text"] for r in rows}) == len(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "model"
    cfg = ClassifyConfig(out=str(out), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, vocab_size=400, epochs=20, lr=3e-3, max_length=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30k-parameter model: one thread is fastest, and robust to a busy machine
    try:
        return out, train_classifier(cfg)
    finally:
        torch.set_num_threads(threads)


def test_trained_classifier_loads_in_transformers_with_same_predictions(trained):
    import transformers

    out, metrics = trained
    rows = [r for r in read_labelled(SHIPPED_INTENTS) if r["split"] == "test"]
    texts = [r["text"] for r in rows]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")  # model_max_length: 32
    with torch.no_grad():
        hf_pred = [hf.config.id2label[int(i)] for i in hf(**enc).logits.argmax(-1)]
    ours = Classifier(out).predict(texts)
    assert [p["label"] for p in ours] == hf_pred
    gold = [r["label"] for r in rows]
    assert metrics["eval_records"] == len(rows) == metrics["n"]
    assert metrics["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, hf_pred)) / len(rows), abs=1e-4)
    assert set(metrics) >= {"macro_f1", "accuracy_en", "accuracy_zh", "macro_f1_zh"}
    assert metrics["final_train_loss"] < 1.2  # it learned the training set (chance: ln 5 = 1.61)


def test_cli_predict_and_eval(trained, tmp_path):
    out, _ = trained
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "classify", "predict", str(out), "我的包裹在哪里",
                        "I forgot my password"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["text"] for x in lines] == ["我的包裹在哪里", "I forgot my password"]
    assert all(x["label"] in {"billing", "shipping", "refund", "account", "technical"} for x in lines)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "label": "x"}\n{"text": "no label"}\n')
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "classify", "eval", str(out), "--data", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f'lmstack: {bad}:2: expected a string "label"']


def test_bad_data_is_refused_with_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_labelled(p)
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match="at least 2 labels"):
        train_classifier(ClassifyConfig(data=str(p), out=str(tmp_path / "o"), epochs=1))
