"""The products app (seed 001) as a pipeline: attributes -> description, LoRA SFT on a real pretrained model,
evaluated base vs tuned on held-out products, ending in a bundle ``lmstack products describe|serve`` loads.

``recipes/products.yaml`` says ``app: products``; ``lmstack run`` finds :data:`APP` through the ``lmstack.apps``
entry point (or, in a source tree, by its module name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.apps.products import recipe as cfg
from lmstack.apps.products import stages as st
from lmstack.pipeline import App, Recipe, Stage, register_app
from lmstack.pipeline.report import fmt, table
from lmstack.pipeline.runner import PipelineResult
from lmstack.pipeline.stages import base_stage, finetune_stage
from lmstack.utils.io import file_sha256, model_dir_hash


def _deps(*names: str):
    return lambda r: [n for n in names if n in r.stages]


def _model_input(r: Recipe) -> dict[str, str]:
    return {"model": model_dir_hash(Path(r.model))} if r.model else {}


def _check(r: Recipe) -> None:
    s = set(r.stages)
    if r.model is not None and "base" in s:
        raise ValueError("the base model comes from one place: `model:` and the base stage both give one; keep one")
    if {"finetune", "eval", "bundle"} & s and r.model is None and "base" not in s:
        raise ValueError("finetune/eval/bundle need a base model: add the base stage (a GGUF file) or set `model:`")
    if {"finetune", "eval"} & s and "data" not in s:
        raise ValueError("the finetune and eval stages need the data stage")


def eval_table(res: PipelineResult) -> list[tuple[str, ...]]:
    """(language, metric, base, tuned) rows of the eval stage's summary."""
    m = res.summary("eval").get("results") or {}
    rows = []
    langs = sorted({lang for who in m.values() for lang in who["by_lang"]})
    for lang in langs:
        for key, name in (("bleu4", "BLEU-4"), ("rougeL", "ROUGE-L"), ("factual", "factual"),
                          ("attributes_stated", "attributes stated"), ("with_invented", "with invented values")):
            vals = [(m.get(who) or {}).get("by_lang", {}).get(lang, {}).get(key) for who in ("base", "tuned")]
            if any(v is not None for v in vals):
                rows.append((lang, name, *(fmt(v) for v in vals)))
    for key, name in (("batched_per_s", "descriptions/s, batched"), ("sequential_per_s", "descriptions/s, one at a time")):
        vals = [(m.get(who) or {}).get("speed", {}).get(key) for who in ("base", "tuned")]
        if any(v is not None for v in vals):
            rows.append(("all", name, *(fmt(v) for v in vals)))
    return rows


def print_tables(res: PipelineResult, console: Any) -> None:
    rows = eval_table(res)
    if rows:
        from rich.table import Table

        t = Table(title=f"held-out products ({res.summary('eval').get('n')} descriptions)")
        for c in ("lang", "metric", "base", "tuned"):
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        console.print(t)


def html_sections(res: PipelineResult) -> list[str]:
    rows = eval_table(res)
    return [f"<h2>Held-out products</h2>{table(('lang', 'metric', 'base', 'tuned'), rows)}"] if rows else []


def next_commands(res: PipelineResult) -> list[str]:
    b = res.summary("bundle").get("bundle")
    if not b:
        return []
    return [f"lmstack products describe {b} --attrs '{{\"name\": \"Oak Serving Board\", \"category\": \"kitchen\", "
            f"\"material\": \"solid oak\", \"colour\": \"natural\", \"size\": \"40 x 25 cm\", \"price\": 39}}'",
            f"lmstack products serve {b} --port 8000   # OpenAI API (same engine); web chat at /"]


def _row_eval(m: dict[str, Any]) -> str:
    out = []
    for who, v in (m.get("results") or {}).items():
        a = v["by_lang"].get("all", {})
        out.append(f"{who}: ROUGE-L {fmt(a.get('rougeL'))}, factual {fmt(a.get('factual'))}, "
                   f"{fmt(v['speed'].get('batched_per_s'))} desc/s")
    return "; ".join(out)


APP = register_app(App(
    "products",
    description="product descriptions from attributes (EN + ZH), LoRA-tuned; BLEU-4 / ROUGE-L / factuality",
    check=_check, summary=print_tables, report=html_sections, next_commands=next_commands,
    stages=[
        Stage("data", st.run_data, config=cfg.DataStage, description="the shipped product dataset: SFT chats + splits",
              inputs=lambda r: {"dataset": file_sha256(st.dataset_path(r)) if st.dataset_path(r).is_file() else "missing"},
              outputs=lambda c: [c.out_dir / n for n in ("sft_train.jsonl", "dev.jsonl", "heldout.jsonl")],
              row=lambda m: f"{m.get('train')} train / {m.get('dev')} dev / {m.get('test')} held-out examples"),
        base_stage(description="the pretrained model the writer starts from, imported from a GGUF file"),
        finetune_stage(wire=lambda r: {"model": str(st.base_model_dir(r)),
                                       "data": {"path": str(r.run_path / "data" / "sft_train.jsonl")}},
                       deps=_deps("data", "base"), description="LoRA SFT: attributes -> description"),
        Stage("eval", st.run_eval, config=cfg.EvalStage, deps=_deps("data", "base", "finetune"),
              description="held-out products, base vs tuned: BLEU-4, ROUGE-L, factuality, descriptions/s",
              inputs=_model_input, outputs=lambda c: [c.out_dir / "results.json"], row=_row_eval),
        Stage("bundle", st.run_bundle, config=cfg.BundleStage, deps=_deps("base", "finetune"),
              description="the writer in one directory: model, adapter, settings", inputs=_model_input,
              depends=lambda r: {"max_tokens": st.section(r, "bundle").max_tokens},
              outputs=lambda c: [c.out_dir / "manifest.json"],
              row=lambda m: f"{m.get('bundle')}: {m.get('files')} files"),
    ]))
