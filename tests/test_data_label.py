"""lmstack data label: kappas against scikit-learn, nltk and Fleiss' published example; Label Studio tasks
round-trip without loss and what lmstack writes passes label-studio-sdk's own validation; uncertainty routing
picks the least confident; merge takes the majority; the CLI runs predict -> route -> merge end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from lmstack.data.label import (
    agreement, cohen_kappa, fleiss_kappa, from_label_studio, merge, read_records, route, to_label_studio,
    write_records,
)
from lmstack.errors import DataError

LABELS = ["billing", "refund", "shipping"]
CONFIG = ('<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single">'
          + "".join(f'<Choice value="{x}"/>' for x in LABELS) + "</Choices></View>")
# Fleiss (1971) as worked on Wikipedia's "Fleiss' kappa" page: 10 items, 14 raters, 5 categories -> 0.210
FLEISS_EXAMPLE = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                  [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_cohen_kappa_matches_sklearn():
    from sklearn.metrics import cohen_kappa_score

    rng = random.Random(0)
    for _ in range(30):
        n = rng.randrange(2, 40)
        a = [rng.choice(LABELS) for _ in range(n)]
        b = [x if rng.random() < 0.6 else rng.choice(LABELS) for x in a]
        if len(set(a) | set(b)) > 1:
            assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))


def test_fleiss_kappa_matches_the_published_example_and_nltk():
    from nltk.metrics.agreement import AnnotationTask

    assert fleiss_kappa(FLEISS_EXAMPLE) == pytest.approx(0.210, abs=5e-4)
    rng = random.Random(1)
    for _ in range(10):
        raters, items = rng.randrange(3, 6), rng.randrange(3, 15)
        data, table = [], []
        for i in range(items):
            truth = rng.choice(LABELS)
            row = [truth if rng.random() < 0.7 else rng.choice(LABELS) for _ in range(raters)]
            data += [(f"r{j}", f"i{i}", x) for j, x in enumerate(row)]
            table.append([row.count(x) for x in LABELS])
        if len({x for _, _, x in data}) > 1:
            assert fleiss_kappa(table) == pytest.approx(AnnotationTask(data=data).pi())  # multi-pi = Fleiss' kappa
    with pytest.raises(DataError, match="same number"):
        fleiss_kappa([[2, 0], [1, 2]])


def _ls_tasks():
    """Tasks shaped like a Label Studio export: server fields, result ids, a cancelled skip, a non-choice result."""
    return [
        {"id": 11, "data": {"text": "I was billed twice", "meta": {"src": "mail"}}, "inner_id": 1,
         "created_at": "2026-01-01T00:00:00Z",
         "annotations": [{"id": 5, "completed_by": 1, "lead_time": 3.5, "was_cancelled": False,
                          "result": [{"id": "a1", "from_name": "label", "to_name": "text", "type": "choices",
                                      "origin": "manual", "value": {"choices": ["billing"]}}]},
                         {"id": 6, "completed_by": 2, "was_cancelled": True, "result": []}],
         "predictions": [{"model_version": "clf-v1", "score": 0.83,
                          "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                      "value": {"choices": ["billing"]}}]}]},
        {"id": 12, "data": {"text": "Where is my parcel?"}},
        {"id": 13, "data": {"text": "refund please"}, "annotations": [
            {"completed_by": 3, "result": [{"from_name": "other", "to_name": "text", "type": "textarea",
                                            "value": {"text": ["free text"]}}]}], "predictions": []},
    ]


def test_label_studio_round_trip_is_lossless(tmp_path):
    tasks = _ls_tasks()
    recs = from_label_studio(json.loads(json.dumps(tasks)))
    assert recs[0]["annotations"][0] == {"annotator": 1, "label": "billing", "result_extra": {
        "id": "a1", "to_name": "text", "origin": "manual"}, "extra": {"id": 5, "lead_time": 3.5, "was_cancelled": False}}
    assert recs[0]["predictions"][0]["label"] == "billing" and recs[0]["predictions"][0]["score"] == 0.83
    assert to_label_studio(recs) == tasks
    # through files: .json (Label Studio) -> .jsonl (records) -> .json again
    (tmp_path / "a.json").write_text(json.dumps(tasks))
    write_records(read_records(tmp_path / "a.json"), tmp_path / "b.jsonl")
    write_records(read_records(tmp_path / "b.jsonl"), tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == tasks


def test_what_lmstack_writes_validates_in_label_studio_sdk():
    li_mod = pytest.importorskip("label_studio_sdk.label_interface")
    li = li_mod.LabelInterface(CONFIG)
    recs = [{"id": i, "data": {"text": f"text {i}"}, "annotations": [{"annotator": 1, "label": LABELS[i % 3]}],
             "predictions": [{"model": "m", "label": LABELS[(i + 1) % 3], "score": 0.5}]} for i in range(3)]
    for t in to_label_studio(recs):
        # (the SDK's validate_task calls validate_annotation() without its argument when a task has annotations,
        # so the task's data and each annotation / prediction are validated separately)
        assert li.validate_task({"id": t["id"], "data": t["data"]}) is not False
        assert all(li.validate_annotation(a) for a in t["annotations"])
        assert all(li.validate_prediction(p) for p in t["predictions"])
    bad = to_label_studio([{**recs[0], "annotations": [{"annotator": 1, "label": "not-a-choice"}]}])[0]
    assert not li.validate_annotation(bad["annotations"][0])
    # and the SDK's own sample annotation / prediction import as labels
    sample = {"id": 1, "data": li.generate_sample_task(), "annotations": [li.generate_sample_annotation()],
              "predictions": [li.generate_sample_prediction()]}
    rec = from_label_studio([sample])[0]
    assert rec["annotations"][0]["label"] in LABELS and rec["predictions"][0]["label"] in LABELS
    assert to_label_studio([rec]) == [sample]


def test_route_merge_and_agreement():
    recs = [{"id": i, "data": {"text": str(i)}, "annotations": [], "predictions": [],
             "uncertainty": {"least_confidence": lc, "margin": m}}
            for i, (lc, m) in enumerate([(0.1, 0.8), (0.6, 0.05), (0.4, 0.3), (0.55, 0.5), (0.2, 0.01)])]
    assert [r["id"] for r in route(recs, 3)] == [1, 3, 2]
    assert [r["id"] for r in route(recs, 2, "margin")] == [4, 1]
    human = [{"id": 1, "annotations": [{"annotator": "ann", "label": "refund"}, {"annotator": "bo", "label": "billing"},
                                       {"annotator": "cy", "label": "refund"}]},
             {"id": 3, "annotations": [{"annotator": "ann", "label": "billing"}, {"annotator": "bo", "label": "billing"},
                                       {"annotator": "cy", "label": "billing"}]},
             {"id": 2, "annotations": [{"annotator": "ann", "label": "shipping"}, {"annotator": "bo", "label": "refund"},
                                       {"annotator": "cy", "label": "refund"}]},
             {"id": 99, "annotations": [{"annotator": "ann", "label": "x"}]}]
    c = merge(recs, human)
    assert c == {"annotations_added": 9, "unknown_ids": 1, "labelled_records": 3, "records": 5}
    assert [recs[i].get("label") for i in range(5)] == [None, "refund", "refund", "billing", None]
    assert [r["id"] for r in route(recs, 5)] == [4, 0]  # annotated tasks are not routed again
    ag = agreement(recs)
    from sklearn.metrics import cohen_kappa_score
    a, b = ["refund", "billing", "shipping"], ["billing", "billing", "refund"]  # ann vs bo on ids 1, 3, 2 (sorted ids)
    assert ag["cohen_pairs"]["ann|bo"]["cohen_kappa"] == pytest.approx(cohen_kappa_score(
        ["refund", "shipping", "billing"], ["billing", "refund", "billing"]), abs=1e-4)
    assert ag["fleiss"]["raters_per_item"] == 3 and ag["fleiss"]["items"] == 3


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from lmstack.model.classify import ClassifyConfig, train_classifier

    out = tmp_path_factory.mktemp("clf") / "m"
    train_classifier(ClassifyConfig(out=str(out), epochs=2, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, max_length=32))
    return out


def test_cli_predict_route_merge(tiny_classifier, tmp_path):
    from lmstack.model.classify import Classifier

    src = tmp_path / "pool.jsonl"
    texts = ["I was charged twice", "where is my parcel", "我忘记密码了", "the app crashes", "refund my order",
             "可以分期付款吗"]
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))

    def cli(*a):
        r = subprocess.run([sys.executable, "-m", "lmstack.cli", "data", "label", *a], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    cli("predict", str(src), "--model", str(tiny_classifier), "--out", str(tmp_path / "pre.jsonl"))
    pre = read_records(tmp_path / "pre.jsonl")
    probs = Classifier(tiny_classifier).probabilities(texts)
    for r, p in zip(pre, probs):
        assert r["predictions"][0]["score"] == pytest.approx(float(p.max()), abs=1e-4)
    routed = cli("route", str(tmp_path / "pre.jsonl"), "--k", "2", "--out", str(tmp_path / "todo.json"))
    want = sorted(range(len(texts)), key=lambda i: -round(1 - float(probs[i].max()), 4))[:2]  # stable on ties
    assert routed["ids"] == [pre[i]["id"] for i in want]
    todo = json.loads((tmp_path / "todo.json").read_text())  # Label Studio import, pre-annotated
    for t in todo:
        t["annotations"] = [{"completed_by": k, "result": [{"from_name": "label", "to_name": "text",
                                                            "type": "choices", "value": {"choices": ["billing"]}}]}
                            for k in (1, 2)]
    (tmp_path / "done.json").write_text(json.dumps(todo))
    merged = cli("merge", str(tmp_path / "pre.jsonl"), "--human", str(tmp_path / "done.json"),
                 "--out", str(tmp_path / "merged.jsonl"))
    assert merged["annotations_added"] == 4 and merged["labelled_records"] == 2
    assert merged["agreement"]["fleiss"]["kappa"] == 1.0
