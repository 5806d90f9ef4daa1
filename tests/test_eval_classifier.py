"""`lmstack eval --model CLASSIFIER_DIR --tasks intents`: a BertForSequenceClassification directory runs the
classification tasks; accuracy and macro-F1 against scikit-learn on predictions made by transformers."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.eval.task import load_task

LABELS = ["account", "billing", "refund", "shipping", "technical"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from lmstack.eval.records import read_records
    from lmstack.model.classify import _train_tokenizer
    from lmstack.model.encoder import Encoder, EncoderConfig, save_encoder

    d = tmp_path_factory.mktemp("clf")
    task = load_task("intents")
    texts = [r.get("intents", "text") for r in read_records(task.data, "intents").items]
    tok = _train_tokenizer(texts, 300, d, 64)
    cfg = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, head="seq_cls",
                        id2label=dict(enumerate(LABELS)), initializer_range=1.0)  # large: varied predictions
    model = Encoder(cfg).init_weights(3)
    save_encoder(model, d)
    return d


def test_eval_classifier_metrics_match_sklearn_on_transformers_predictions(classifier_dir, tmp_path):
    import transformers
    from sklearn.metrics import accuracy_score, f1_score

    from lmstack.eval.records import read_records
    from lmstack.eval.run import run_eval

    res = run_eval(classifier_dir, ["intents"], tmp_path / "out")
    r = res["tasks"]["intents"]
    assert res["model"]["architecture"] == "BertForSequenceClassification" and r["n"] == 20
    # the reference: transformers' classifier on the same tokenizer's ids
    task = load_task("intents")
    recs = read_records(task.data, "intents").items
    hf_tok = transformers.AutoTokenizer.from_pretrained(classifier_dir)
    hf = transformers.BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    enc = hf_tok([x.get("intents", "text") for x in recs], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = [hf.config.id2label[int(i)] for i in hf(**enc).logits.argmax(-1)]
    gold = [x.get("intents", "label") for x in recs]
    assert len(set(pred)) >= 2  # not a constant classifier
    assert [s["pred"] for s in map(json.loads, (tmp_path / "out" / "samples" / "intents.jsonl").open())] == pred
    assert r["metrics"]["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert r["metrics"]["macro_f1"] == pytest.approx(
        f1_score(gold, pred, labels=LABELS, average="macro", zero_division=0), abs=1e-12)
    assert (tmp_path / "out" / "report.md").is_file()


def test_eval_cli_refuses_lm_tasks_on_a_classifier(classifier_dir, tmp_path):
    from tests.test_train_mlm_cli import run_cli

    rc, out = run_cli("eval", "--model", str(classifier_dir), "--tasks", "intents,ppl_en")
    assert rc == 2 and out.startswith("lmstack: ") and "Traceback" not in out, out
    assert "task ppl_en (perplexity) needs a causal language model" in out
    rc, out = run_cli("eval", "--model", str(classifier_dir), "--tasks", "intents", "--out", str(tmp_path / "o"))
    assert rc == 0, out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["tasks"]["intents"]["n"] == 20
