"""The products app (lmstack.apps.products): the shipped dataset is what its generator writes, every reference
passes the factuality check, the check catches missing and invented values, the scores are sacrebleu's and
rouge-score's, and the recipe runs end to end (tiny model) into a bundle that `lmstack products describe` serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.apps.products.catalog import LANGS, build, factuality, vocabulary

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "recipes" / "data" / "products" / "products.jsonl"


@pytest.fixture(scope="module")
def rows():
    return [json.loads(x) for x in SHIPPED.read_text(encoding="utf-8").splitlines()]


def test_shipped_dataset_is_the_generators_output(rows):
    from lmstack.apps.support.kb import load_kb

    assert build(load_kb().products) == rows


def test_dataset_splits_by_product_in_both_languages(rows):
    by_split: dict[str, set[str]] = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add(r["id"])
    assert set(by_split) == {"train", "dev", "test"}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["dev"])
    assert {r["source"] for r in rows} == {"catalog", "generated"}
    for lang in LANGS:  # each product once per language
        assert sorted(r["id"] for r in rows if r["lang"] == lang) == sorted({r["id"] for r in rows})
    assert sum(r["source"] == "catalog" for r in rows) == 60  # the shop's 30 products, EN + ZH
    assert all(set(r["attributes"]) >= {"name", "category", "material", "colour", "price"} for r in rows)


def test_every_reference_passes_factuality(rows):
    bad = [(r["id"], r["lang"], factuality(r["description"], r["attributes"], r["lang"])) for r in rows
           if not factuality(r["description"], r["attributes"], r["lang"])["ok"]]
    assert bad == []


def test_factuality_catches_missing_and_invented_values():
    a = {"name": "Oak Serving Board", "category": "kitchen", "material": "solid oak", "colour": "natural",
         "size": "40 x 25 cm", "price": "$39"}
    ok = "The Oak Serving Board is a kitchen board of solid oak in natural, 40 x 25 cm, for $39."
    assert factuality(ok, a, "en") == {"missing": [], "invented": [], "ok": True}
    assert factuality(ok.replace("natural", "teal"), a, "en")["missing"] == ["colour"]
    assert factuality(ok.replace("natural", "natural and teal"), a, "en")["invented"] == ["teal"]
    assert factuality(ok.replace("$39", "$39, was $59"), a, "en")["invented"] == ["59"]
    assert factuality(ok + " Made of brass.", a, "en")["invented"] == ["brass"]
    assert factuality(ok.upper(), a, "en")["ok"]  # English values match case-insensitively
    # a longer value that contains a vocabulary word is the product's own, not an invention
    b = {**a, "material": "German stainless steel"}
    assert factuality(ok.replace("solid oak", "German stainless steel"), b, "en")["ok"]
    z = {"name": "橡木餐板", "category": "厨房", "material": "实心橡木", "colour": "原木色", "price": "39美元"}
    assert factuality("橡木餐板采用实心橡木，原木色，适合厨房，售价39美元。", z, "zh")["ok"]
    assert factuality("橡木餐板采用实心橡木，原木色，适合厨房，售价39美元，另有黑色。", z, "zh")["invented"] == ["黑色"]
    assert "teal" in vocabulary("en")["colour"] and "青绿色" in vocabulary("zh")["colour"]


def test_scores_are_sacrebleu_and_rouge_score(rows):
    import sacrebleu
    from rouge_score import rouge_scorer

    from lmstack.apps.products.stages import score

    sample = [r for r in rows if r["split"] == "test"][:6]
    preds = [r["description"].replace("costs", "is") if i % 2 else r["description"][: len(r["description"]) // 2]
             for i, r in enumerate(sample)]
    s = score(sample, preds)["by_lang"]
    for lang, tok in (("en", "13a"), ("zh", "zh")):
        idx = [i for i, r in enumerate(sample) if r["lang"] == lang]
        ref = sacrebleu.corpus_bleu([preds[i] for i in idx], [[sample[i]["description"] for i in idx]], tokenize=tok)
        assert s[lang]["bleu4"] == pytest.approx(ref.score)
    en = [i for i, r in enumerate(sample) if r["lang"] == "en"]
    sc = rouge_scorer.RougeScorer(["rougeL"])  # on English, lmstack's tokenizer is rouge-score's default
    ref_l = sum(sc.score(sample[i]["description"], preds[i])["rougeL"].fmeasure for i in en) / len(en)
    assert s["en"]["rougeL"] == pytest.approx(ref_l)
    fact = [factuality(p, r["attributes"], r["lang"])["ok"] for p, r in zip(preds, sample)]
    assert s["all"]["factual"] == pytest.approx(sum(fact) / len(fact))


def test_recipe_runs_end_to_end_and_the_bundle_describes(tmp_path):
    """data -> LoRA finetune -> eval (base vs tuned) -> bundle on a tiny model, then the CLI on the bundle."""
    from lmstack.pipeline import load_recipe, run_recipe
    from tests.serve_fixtures import tiny_model_dir

    model = tiny_model_dir(tmp_path / "m", max_position_embeddings=512)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""name: p
app: products
model: {model}
run_dir: {tmp_path / 'run'}
stages: [data, finetune, eval, bundle]
finetune:
  method: lora
  lora: {{r: 4, alpha: 8, target_modules: all-linear}}
  data: {{max_len: 256, batch_size: 2, val_fraction: 0.0}}
  train: {{steps: 2, warmup_steps: 0, log_every: 1, eval_every: 1000, ckpt_every: 1000}}
eval: {{heldout_limit: 4, max_tokens: 8, speed_sequential: 2}}
bundle: {{max_tokens: 8}}
""")
    res = run_recipe(load_recipe(recipe, []), show_progress=False)
    ev = res.summary("eval")
    assert ev["n"] == 4 and set(ev["results"]) == {"base", "tuned"}
    for who in ("base", "tuned"):
        r = ev["results"][who]
        assert set(r["by_lang"]) == {"en", "zh", "all"} and r["speed"]["batched_per_s"] > 0
        assert r["by_lang"]["en"]["n"] == 2 and 0 <= r["by_lang"]["all"]["factual"] <= 1
    samples = [json.loads(x) for x in (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all("text" in s["tuned"] and "missing" in s["tuned"] for s in samples)
    bundle = tmp_path / "run" / "bundle"
    assert json.loads((bundle / "manifest.json").read_text())["app"] == "products"
    out = subprocess.run([sys.executable, "-m", "lmstack.cli", "products", "describe", str(bundle), "--attrs",
                          json.dumps({"name": "Oak Board", "material": "oak", "price": 12})],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(line) == {"description", "factual", "check"}
    bad = subprocess.run([sys.executable, "-m", "lmstack.cli", "products", "describe", str(bundle), "--attrs",
                          json.dumps({"name": "x", "weight": 3})], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown attribute 'weight'" in bad.stderr and "Traceback" not in bad.stderr
