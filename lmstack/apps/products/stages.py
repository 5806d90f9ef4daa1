"""The products app's own stages (seed 001: attributes -> product description):

========  ===================================================================  ===============================
stage     calls                                                                writes under runs/NAME/
========  ===================================================================  ===============================
data      the shipped dataset (catalog.py): chats for SFT, the held-out split   data/ (sft_train.jsonl, ...)
base      the library's stage: a GGUF file -> a model directory                base/model
finetune  the library's stage: LoRA SFT on data/sft_train.jsonl                 finetune/final (adapter)
eval      base vs tuned on held-out products: BLEU-4 (sacrebleu), ROUGE-L,     eval/ (results.json,
          factuality (catalog.factuality), descriptions/s through the engine    samples.jsonl)
bundle    the writer in one directory (model + adapter + settings)              bundle/
========  ===================================================================  ===============================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.pipeline import Recipe, StageContext
from lmstack.utils.io import iter_jsonl, write_jsonl

SHIPPED = Path(__file__).resolve().parents[3] / "recipes" / "data" / "products" / "products.jsonl"


def section(recipe: Recipe, name: str) -> Any:
    from lmstack.apps.products.pipeline import APP

    return APP.registry[name].configure(recipe)


def dataset_path(recipe: Recipe) -> Path:
    """``data.path`` (relative to the working directory, else to the recipe file), else the shipped file next to
    the recipe (``recipes/data/products``), else the source checkout's."""
    here = Path(recipe.source).parent if recipe.source else None
    p = section(recipe, "data").path
    if p:
        q = Path(p).expanduser()
        if not q.is_absolute() and not q.exists() and here is not None and (here / q).exists():
            q = here / q
        return q
    if here is not None and (here / "data" / "products" / "products.jsonl").is_file():
        return here / "data" / "products" / "products.jsonl"
    return SHIPPED


def base_model_dir(recipe: Recipe) -> Path:
    if recipe.model is not None:
        return Path(recipe.model)
    return recipe.run_path / "base" / "model"


def tuned(recipe: Recipe, summaries: dict[str, Any]) -> tuple[Path, Path | None]:
    """(model dir, adapter dir or None) of the fine-tuned writer."""
    final = Path((summaries.get("finetune") or {}).get("final_dir") or recipe.run_path / "finetune" / "final")
    if (final / "adapter_config.json").is_file():
        return base_model_dir(recipe), final
    return final, None


def read_examples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"product dataset {path} not found; regenerate it with "
                        "`python -m lmstack.apps.products.catalog recipes/data/products/products.jsonl`")
    rows = []
    for i, r in enumerate(iter_jsonl(path), 1):
        if not isinstance(r, dict) or not {"lang", "split", "attributes", "prompt", "description"} <= set(r):
            raise DataError(f"{path}:{i}: expected lang, split, attributes, prompt, description")
        rows.append(r)
    return rows


def run_data(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.config
    src = dataset_path(ctx.recipe)
    rows = [r for r in read_examples(src) if r["lang"] in cfg.langs]
    by = {s: [r for r in rows if r["split"] == s] for s in ("train", "dev", "test")}
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["description"]}]}
             for r in by["train"] for _ in range(cfg.train_repeat)]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(ctx.out_dir / "sft_train.jsonl", chats)
    write_jsonl(ctx.out_dir / "dev.jsonl", by["dev"])
    write_jsonl(ctx.out_dir / "heldout.jsonl", by["test"])
    train_ids, test_ids = {r["id"] for r in by["train"]}, {r["id"] for r in by["test"]}
    if train_ids & test_ids:  # the split is by product: a held-out product is never trained on
        raise DataError(f"{src}: products {sorted(train_ids & test_ids)[:3]} are in both train and test")
    return {"source": str(src), "train": len(by["train"]), "dev": len(by["dev"]), "test": len(by["test"]),
            "chats": len(chats), "langs": list(cfg.langs)}


def _balanced(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is None or limit >= len(rows):
        return rows
    langs = sorted({r["lang"] for r in rows})
    per = {lang: [r for r in rows if r["lang"] == lang] for lang in langs}
    out: list[dict[str, Any]] = []
    i = 0
    while len(out) < limit:
        for lang in langs:
            if i < len(per[lang]) and len(out) < limit:
                out.append(per[lang][i])
        i += 1
    return out


def score(rows: list[dict[str, Any]], texts: list[str]) -> dict[str, Any]:
    """BLEU-4 (sacrebleu, per language: 13a for English, zh for Chinese), ROUGE-L (rouge-score, CJK characters as
    tokens) and the share of descriptions that state every attribute and invent none; per language and overall."""
    from lmstack.apps.products.catalog import factuality
    from lmstack.eval.metrics import bleu, rouge

    facts = [factuality(t, r["attributes"], r["lang"]) for r, t in zip(rows, texts)]
    out: dict[str, Any] = {}
    for lang in sorted({r["lang"] for r in rows}) + ["all"]:
        idx = [i for i, r in enumerate(rows) if lang in ("all", r["lang"])]
        preds, refs = [texts[i] for i in idx], [rows[i]["description"] for i in idx]
        n_attr = sum(len(rows[i]["attributes"]) for i in idx)
        out[lang] = {
            "n": len(idx),
            "bleu4": bleu(preds, refs) if lang != "all" else None,  # one tokenizer per corpus: per language only
            "rougeL": rouge(preds, refs, types=("rougeL",))["rougeL"],
            "factual": sum(facts[i]["ok"] for i in idx) / len(idx),
            "attributes_stated": 1 - sum(len(facts[i]["missing"]) for i in idx) / max(n_attr, 1),
            "with_invented": sum(bool(facts[i]["invented"]) for i in idx) / len(idx),
        }
    return {"by_lang": out, "facts": facts}


def run_eval(ctx: StageContext) -> dict[str, Any]:
    import gc

    from lmstack.apps.products.writer import DescriptionWriter, chat, throughput
    from lmstack.serve.llm import load

    cfg, r = ctx.config, ctx.recipe
    rows = _balanced(list(iter_jsonl(r.run_path / "data" / "heldout.jsonl")), cfg.heldout_limit)
    chats = [chat(x["attributes"], x["lang"]) for x in rows]
    models: list[tuple[str, Path, Path | None]] = []
    if cfg.compare_base or "finetune" not in r.stages:
        models.append(("base", base_model_dir(r), None))
    if "finetune" in r.stages:
        models.append(("tuned", *tuned(r, ctx.summaries)))
    results: dict[str, Any] = {}
    samples: list[dict[str, Any]] = [dict(x) for x in rows]
    for who, model, adapter in models:
        w = DescriptionWriter(load(model, adapter=adapter, max_num_seqs=32), cfg.max_tokens)
        sp = throughput(w, chats, sequential=cfg.speed_sequential)
        texts = sp.pop("texts")
        sc = score(rows, texts)
        for s, t, f in zip(samples, texts, sc["facts"]):
            s[who] = {"text": t, **f}
        results[who] = {"by_lang": sc["by_lang"], "speed": sp}
        ctx.log(f"{who}: " + ", ".join(f"{lang} BLEU-4 {m['bleu4'] if m['bleu4'] is not None else '-'} ROUGE-L "
                                       f"{m['rougeL']:.3f} factual {m['factual']:.0%}" for lang, m in sc["by_lang"].items())
                + f"; {sp['batched_per_s']:.2f} descriptions/s batched")
        del w
        gc.collect()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(ctx.out_dir / "samples.jsonl", samples)
    (ctx.out_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return {"n": len(rows), "results": results, "samples": str(ctx.out_dir / "samples.jsonl")}


def run_bundle(ctx: StageContext) -> dict[str, Any]:
    from lmstack.apps.bundle import write_bundle

    r = ctx.recipe
    model, adapter = tuned(r, ctx.summaries) if "finetune" in r.stages else (base_model_dir(r), None)
    b = write_bundle(ctx.out_dir, "products", {"model": model, "adapter": adapter},
                     {"max_tokens": ctx.config.max_tokens, "recipe": r.name}, link=ctx.config.files == "link")
    return {"bundle": str(b.root), "parts": b.parts, "files": len(b.files)}
