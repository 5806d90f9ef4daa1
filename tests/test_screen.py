"""The two-stage risk screen (lmstack/apps/screen): the shipped data is its generator's output, the threshold and
the band are checked against scikit-learn's ROC curve and a count, int8 against the float classifier, the LLM's
verdicts against the JSON schema (a random model cannot write JSON: parsing is the constraint's doing), and the
recipe end to end with a tiny random LLM, its bundle and ``lmstack screen score``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from lmstack.apps.screen import data as sd
from lmstack.apps.screen.cascade import (VERDICT_SCHEMA, Screen, Stage2, band_around, parse_verdict, threshold_at_fpr,
                                     verdict_messages)
from lmstack.apps.screen.stages import percentile, quality
from tests.serve_fixtures import tiny_model_dir

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ data
def test_shipped_file_is_the_generator_output():
    shipped = sd.read(sd.SHIPPED)
    assert shipped == json.loads(json.dumps(sd.generate()))  # lmstack screen data --out FILE writes it again


def test_splits_hold_out_templates_and_cover_both_languages():
    rows = sd.generate(600, seed=5)
    train = [r for r in rows if r["split"] == "train"]
    assert train and not any(r["heldout_template"] for r in train)
    for split in ("dev", "test"):
        part = [r for r in rows if r["split"] == split]
        assert any(r["heldout_template"] for r in part)
        assert {r["lang"] for r in part} == {"en", "zh"} and {r["label"] for r in part} == {"fraud", "legit"}
    for r in rows:  # the label is the scenario's; the message is one of the scenario's templates
        assert r["label"] == sd.SCENARIOS[r["scenario"]]["label"]
        assert r["text"].endswith(r["message"] or ("(no message)" if r["lang"] == "en" else "（无留言）"))


def test_bad_data_file_is_one_clear_error(tmp_path):
    from lmstack.errors import DataError

    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"text": "a", "label": "maybe", "split": "train"}) + "\n")
    with pytest.raises(DataError, match="label 'maybe'"):
        sd.read(p)


# ------------------------------------------------------------------------------------------------ thresholds
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.0, 0.05, 0.2])
def test_threshold_gives_the_roc_curves_best_recall_at_the_fpr(seed, target):
    from sklearn.metrics import roc_curve

    rng = random.Random(seed)
    gold = [int(rng.random() < 0.3) for _ in range(300)]
    scores = [round(min(1, max(0, rng.gauss(0.35 + 0.3 * g, 0.2))), 2) for g in gold]  # ties on purpose
    t = threshold_at_fpr(scores, gold, target)
    fpr, tpr, _ = roc_curve(gold, scores)
    best = max(tp for fp, tp in zip(fpr, tpr) if fp <= target + 1e-12)
    neg, pos = gold.count(0), gold.count(1)
    fp = sum(s >= t and not g for s, g in zip(scores, gold)) / neg
    tp = sum(s >= t and g for s, g in zip(scores, gold)) / pos
    assert fp <= target + 1e-12 and tp == pytest.approx(best)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.3, 1.0])
def test_band_holds_the_share_nearest_the_threshold(share):
    rng = random.Random(3)
    scores = [rng.random() for _ in range(400)]
    t = 0.8  # off-centre: fewer items above than below
    lo, hi = band_around(scores, t, share)
    assert lo <= t <= hi
    inside = [s for s in scores if lo <= s < hi]
    assert len(inside) == round(share * len(scores))
    outside = [s for s in scores if not lo <= s < hi]
    if inside and outside:  # nothing outside the band is nearer the threshold in rank than everything inside
        rank = {s: i for i, s in enumerate(sorted(scores))}
        r_t = sum(s < t for s in scores)
        assert max(abs(rank[s] - r_t) for s in inside) <= min(abs(rank[s] - r_t) for s in outside) + len(inside)


def test_quality_and_percentile_against_hand_counts():
    gold = ["fraud", "fraud", "legit", "legit", "legit"]
    pred = ["fraud", "legit", "fraud", "legit", "legit"]
    q = quality(gold, pred)
    assert (q["accuracy"], q["recall"], q["fpr"], q["precision"]) == (0.6, 0.5, round(1 / 3, 4), 0.5)
    import numpy as np

    rng = random.Random(0)
    for n in (1, 7, 12, 100, 333):
        xs = [rng.random() for _ in range(n)]
        for q in (50, 90, 99, 100):  # nearest rank = numpy's inverted_cdf
            assert percentile(xs, q) == float(np.percentile(xs, q, method="inverted_cdf"))


# ------------------------------------------------------------------------------------------------ stages
class _Scores:
    def __init__(self, p):
        self.p = p

    def scores(self, texts):
        return [self.p[t] for t in texts]


class _Judge:
    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def judge(self, texts):
        self.seen += list(texts)
        return [self.answers[t] for t in texts]


def test_cascade_sends_only_the_band_to_the_llm():
    p = {"a": 0.05, "b": 0.45, "c": 0.55, "d": 0.95, "e": 0.5}
    judge = _Judge({"b": {"label": "fraud", "reason": "r"}, "c": {"label": "legit", "reason": "r"}, "e": None})
    out = Screen(_Scores(p), judge, threshold=0.52, lo=0.4, hi=0.6).decide(list(p))
    assert sorted(judge.seen) == ["b", "c", "e"]
    assert [o["label"] for o in out] == ["legit", "fraud", "legit", "fraud", "legit"]
    assert [o["by"] for o in out] == ["classifier", "llm", "llm", "classifier", "fallback"]


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("screen") / "llm", max_position_embeddings=2048)


def test_llm_verdicts_follow_the_schema(tiny_llm_dir):
    import lmstack

    s2 = Stage2(lmstack.load(tiny_llm_dir, max_num_seqs=8), max_tokens=256)  # reason <= 80 chars: it must close
    items = [r["text"] for r in sd.generate(40, seed=9)[:6]]
    outs = s2.llm.generate([s2.llm.chat_prompt(verdict_messages(t)) for t in items], s2.params, use_tqdm=False)
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) == len(items)
    for o in finished:
        v = json.loads(o.text)
        jsonschema.validate(v, VERDICT_SCHEMA)
        assert parse_verdict(o.text) == v
    assert parse_verdict('{"label": "fraud", "reason": "cut') is None


def test_int8_classifier_tracks_float(tmp_path):
    from lmstack.apps.screen.cascade import Stage1
    from lmstack.model.classify import ClassifyConfig, train_classifier

    rows = sd.generate(200, seed=4)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n"
                         for r in rows))
    train_classifier(ClassifyConfig(data=str(f), out=str(tmp_path / "m"), epochs=2, hidden_size=64,
                                    intermediate_size=128, max_length=96, vocab_size=400))
    texts = [r["text"] for r in rows[:64]]
    q, fl = Stage1(tmp_path / "m", quantize=True), Stage1(tmp_path / "m", quantize=False)
    assert q.quantized and not fl.quantized
    a, b = torch.tensor(q.scores(texts)), torch.tensor(fl.scores(texts))
    assert not torch.equal(a, b)  # the swap happened
    torch.testing.assert_close(a, b, atol=0.03, rtol=0)


# ------------------------------------------------------------------------------------------------ end to end
def test_recipe_end_to_end_bundle_and_cli(tmp_path, tiny_llm_dir):
    from lmstack.apps.bundle import read_bundle, verify
    from lmstack.pipeline import run_recipe

    sd.write(tmp_path / "items.jsonl", n=240, seed=7)
    recipe = tmp_path / "screen.yaml"
    recipe.write_text(f"""name: t
app: screen
model: {tiny_llm_dir}
run_dir: {tmp_path / 'run'}
stages: [data, classifier, eval, bundle]
data: {{path: {tmp_path / 'items.jsonl'}}}
classifier: {{epochs: 1, hidden_size: 32, vocab_size: 300, max_length: 64}}
eval: {{band_share: 0.3, llm_only_limit: 4, latency_items: 2, max_tokens: 24}}
""")
    res = run_recipe(recipe)
    m = res.summary("eval")
    assert set(m["systems"]) == {"classifier", "llm_only", "cascade"}
    assert m["systems"]["cascade"]["llm_items"] == round(m["llm_share"] * m["test_n"])
    lo, hi = m["band"]
    assert lo <= m["threshold"] <= hi
    b = read_bundle(tmp_path / "run" / "bundle", app="screen")
    assert not verify(b) and b.settings["threshold"] == m["threshold"]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMSTACK_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "lmstack.cli", "screen", "score", str(b.root), "--no-llm"]
    ok = subprocess.run(cmd + ["amount 5.00 USD; category grocery; message: milk"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    d = json.loads(ok.stdout.strip().splitlines()[-1])
    assert d["label"] in ("fraud", "legit") and d["by"] in ("classifier",) and 0 <= d["score"] <= 1
    bad = subprocess.run(cmd[:4] + [str(tmp_path), "x"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
