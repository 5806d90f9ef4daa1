"""Token classification (lmstack/model/tokclass.py, `lmstack classify train --task tokens`): entity-level scores
against seqeval, word-piece label alignment, the CLI end to end (the saved tagger loads in
transformers.BertForTokenClassification with the same logits), and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.model.encoder import IGNORE_INDEX
from lmstack.model.tokclass import encode_words, entities, entity_scores
from tests.test_train_mlm_cli import run_cli

GOLD = [
    ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG", "I-ORG"],
    ["O", "B-EMAIL", "O", "O", "B-PHONE", "O"],
    ["B-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "I-LOC"],
    ["O", "O", "O"],
]
PRED = [
    ["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "I-ORG", "O"],  # right PER, wrong type, short span
    ["O", "I-EMAIL", "O", "B-PHONE", "I-PHONE", "O"],  # I- without B- starts an entity; a span too long
    ["B-PER", "I-LOC", "B-PER", "I-PER", "O", "B-LOC", "I-LOC"],  # a type switch inside starts a new entity
    ["B-ORG", "O", "I-PER"],  # false positives only
]


def test_entity_scores_match_seqeval():
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    s = entity_scores(GOLD, PRED)
    assert s["precision"] == pytest.approx(precision_score(GOLD, PRED), abs=1e-12)
    assert s["recall"] == pytest.approx(recall_score(GOLD, PRED), abs=1e-12)
    assert s["f1"] == pytest.approx(f1_score(GOLD, PRED), abs=1e-12)
    rep = classification_report(GOLD, PRED, output_dict=True, zero_division=0)
    for ty, v in s["per_type"].items():
        assert v["f1"] == pytest.approx(rep[ty]["f1-score"], abs=1e-4), ty
        assert v["support"] == rep[ty]["support"], ty
    assert 0 < s["f1"] < 1  # the fixed predictions are partly right
    assert entities(["I-X", "I-X", "B-X", "I-Y"]) == [("X", 0, 2), ("X", 2, 3), ("Y", 3, 4)]


class _Pieces:
    """A stand-in tokenizer: each word (with its leading space) becomes len(word) // 3 + 1 pieces."""

    def encode_batch(self, words, add_special_tokens=False):
        return [[100 + i for i in range(len(w.strip()) // 3 + 1)] for w in words]

    def token_to_id(self, t):
        return 1


def test_word_piece_alignment_labels_the_first_piece():
    words = [["Al", "Smithson", "x"], ["Hello"]]
    tags = [[1, 2, 0], [0]]
    ids, mask, lab, first = encode_words(_Pieces(), words, 32, 0, cls_id=7, sep_id=8, tags=tags)
    # [CLS] Al(1 piece) Smithson(3 pieces) x(1) [SEP]
    assert ids[0].tolist() == [7, 100, 100, 101, 102, 100, 8] and first[0] == [1, 2, 5]
    assert lab[0].tolist() == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0] and lab[1, 4:].eq(IGNORE_INDEX).all()
    _, _, lab_t, first_t = encode_words(_Pieces(), words[:1], 4, 0, 7, 8, tags[:1])  # truncated: [CLS] Al [SEP]
    assert first_t[0] == [1, -1, -1] and lab_t[0].tolist() == [IGNORE_INDEX, 1, IGNORE_INDEX]


def test_classify_tokens_cli_end_to_end(tmp_path):
    import transformers
    from seqeval.metrics import f1_score

    from lmstack.model.encoder import load_encoder
    from lmstack.model.tokclass import SHIPPED_NER, Tagger, read_tagged

    out = tmp_path / "tagger"
    rc, log = run_cli("classify", "train", "--task", "tokens", "--out", str(out), "--epochs", "6")
    assert rc == 0, log
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_records"] == 20 and "f1_en" in m and "f1_zh" in m
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["BertForTokenClassification"] and conf["id2label"]["0"] == "O"
    hf = transformers.BertForTokenClassification.from_pretrained(out).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(out)(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    held = [r for r in read_tagged(SHIPPED_NER) if r.get("split") == "test"]
    pred = Tagger(out).tag([r["tokens"] for r in held])
    assert m["f1"] == pytest.approx(f1_score([r["tags"] for r in held], pred), abs=1e-4)
    rc, log = run_cli("classify", "predict", str(out), "My name is Alice Smith", "我叫王芳")
    assert rc == 0 and len(log.strip().splitlines()) == 2 and "entities" in json.loads(log.splitlines()[0])


@pytest.mark.parametrize("line, msg", [
    ('{"tokens": ["a", "b"], "tags": ["O"]}', "2 tokens but 1 tags"),
    ('{"tokens": ["a"], "tags": ["PER"]}', "tag 'PER' is not BIO"),
    ('{"text": "a"}', 'expected "tokens"'),
])
def test_classify_tokens_bad_data(tmp_path, line, msg):
    f = tmp_path / "d.jsonl"
    f.write_text('{"tokens": ["Al"], "tags": ["B-PER"]}\n' + line + "\n")
    rc, log = run_cli("classify", "train", "--task", "tokens", "--data", str(f), "--out", str(tmp_path / "o"))
    assert rc == 2 and log.startswith("lmstack: ") and f"{f}:2: " in log and msg in log and "Traceback" not in log, log
