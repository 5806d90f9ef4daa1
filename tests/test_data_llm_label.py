"""LLM pre-labels (`lmstack data label predict --prelabel llm`): a tiny random decoder prompted with the label set;
every prediction is one of the labels, scores are probabilities in [0, 1] that sum to 1 over the labels with the
prediction's score the largest, and they equal the label-sequence probabilities computed with transformers on the
same model and ids (the independent reference); Label Studio output carries the scores; bad flags exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.cli import main as cli_main
from lmstack.data.label import read_records
from lmstack.data.llm_label import LLMLabeler, prelabel_llm
from tests.serve_fixtures import tiny_model_dir

LABELS = ["billing", "shipping", "ref", "refund"]  # "ref" is a prefix of "refund": the end token separates them
TEXTS = ["I was charged twice", "where is my parcel", "我忘记密码了", "refund my order please", ""]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llm_label") / "m")


def test_predictions_are_labels_with_consistent_scores(model_dir):
    recs = [{"id": i, "data": {"text": t}, "annotations": [], "predictions": []} for i, t in enumerate(TEXTS)]
    prelabel_llm(recs, model_dir, LABELS)
    seen = set()
    for r in recs:
        (p,) = r["predictions"]
        assert p["label"] in LABELS and 0.0 <= p["score"] <= 1.0
        probs = r["label_probs"]
        assert set(probs) == set(LABELS) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert p["score"] == pytest.approx(max(probs.values()), abs=1e-4) and probs[p["label"]] == max(probs.values())
        top2 = sorted(probs.values())[-2:]
        assert r["uncertainty"]["margin"] == pytest.approx(top2[1] - top2[0], abs=1e-4)
        seen.add(p["label"])
    prelabel_llm(recs, model_dir, LABELS)  # again: replaces its own prediction, does not stack
    assert all(len(r["predictions"]) == 1 for r in recs)


def test_probabilities_equal_transformers_sequence_scores(model_dir):
    import transformers

    lab = LLMLabeler(model_dir, LABELS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for text in TEXTS[:3]:
        prefix = lab.prefix(text)
        scores = []
        for c in lab.choices:  # one unpadded sequence per label, log-probs summed by hand
            ids = torch.tensor([prefix + c])
            with torch.no_grad():
                lp = torch.log_softmax(hf(ids).logits[0].double(), -1)
            scores.append(sum(lp[len(prefix) - 1 + k, tok] for k, tok in enumerate(c)))
        want = torch.softmax(torch.stack(scores), 0)
        got = lab.probabilities(text)
        torch.testing.assert_close(torch.tensor([got[x] for x in LABELS], dtype=torch.float64), want,
                                   atol=1e-5, rtol=1e-4)


def test_cli_llm_prelabel_to_label_studio(model_dir, tmp_path, capsys):
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS[:3]), encoding="utf-8")
    rc = cli_main(["data", "label", "predict", str(src), "--prelabel", "llm", "--model", str(model_dir),
                   "--labels", ",".join(LABELS), "--prompt", "Labels: {labels}\nText: {text}\nLabel?",
                   "--out", str(tmp_path / "pre.json")])
    assert rc in (0, None)
    tasks = json.loads((tmp_path / "pre.json").read_text())
    for t in tasks:
        (p,) = t["predictions"]
        assert p["result"][0]["value"]["choices"][0] in LABELS and 0 <= p["score"] <= 1
    assert [r["predictions"][0]["label"] for r in read_records(tmp_path / "pre.json")] == \
        [t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks]
    capsys.readouterr()
    base = ["data", "label", "predict", str(src), "--model", str(model_dir), "--out", str(tmp_path / "x.jsonl")]
    for bad in (["--prelabel", "llm", "--labels", "a,b", "--prompt", "no placeholder"],
                ["--prelabel", "llm", "--labels", "only-one"], ["--prelabel", "magic"]):
        assert cli_main(base + bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
