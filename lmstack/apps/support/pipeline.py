"""The support app as a pipeline: its stages in order, how they connect, and the bundle it ends in.

``recipes/quickstart.yaml`` says ``app: support``; ``lmstack run`` finds :data:`APP` through the
``lmstack.apps`` entry point. Its own stages (data, rag, tokenizer, reader, eval, bundle) have the configs of
:mod:`lmstack.apps.support.recipe`; pretrain and finetune are the library's stages
(:mod:`lmstack.pipeline.stages`) with ``wire`` saying what they read: the tokenizer stage's shards, the base
model, the (grounded) support chats.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmstack.apps.support import recipe as cfg
from lmstack.apps.support import desk_stages as ds, report, stages as st
from lmstack.pipeline import App, Recipe, Stage, StageContext, register_app
from lmstack.pipeline.stages import base_stage, finetune_stage, pretrain_stage, quantize_stage
from lmstack.utils.io import dir_sha256, file_sha256, model_dir_hash


def _deps(*names: str):
    return lambda r: [n for n in names if n in r.stages]


def _model_input(r: Recipe) -> dict[str, str]:
    return {"model": model_dir_hash(Path(r.model))} if r.model else {}


def _check(r: Recipe) -> None:
    s = set(r.stages)
    starts = [x for x in ("`model:`" if r.model is not None else None, "the base stage" if "base" in s else None,
                          "the pretrain stage" if "pretrain" in s else None) if x]
    if len(starts) > 1:
        raise ValueError(f"the base model comes from one place: {' and '.join(starts)} both give one; keep one")
    if {"finetune", "eval"} & s and not starts:
        raise ValueError("finetune/eval need a base model: add the base stage (a GGUF file), the pretrain stage "
                         "or set `model: PATH`")
    if "reader" in s and "rag" not in s:
        raise ValueError("the reader stage ranks passage sentences: add the rag stage before it")
    if "rag" in s and st.section(r, "rag").context == "units":
        if "reader" not in s:
            raise ValueError("rag.context: units shows the answer units the reader stage ranks: add the reader "
                             "stage (or use rag.context: passages)")
        if "lm" in st.section(r, "reader").features:
            raise ValueError("rag.context: units ranks the units before any model is tuned: drop `lm` from "
                             "reader.features")
        if "finetune" in s and r.stages.index("finetune") < r.stages.index("reader"):
            raise ValueError("rag.context: units: the reader stage writes the prompts finetune reads; list it "
                             "before finetune in stages")
    elif {"reader", "finetune"} <= s and r.stages.index("reader") < r.stages.index("finetune") and \
            "lm" in st.section(r, "reader").features:
        raise ValueError("the reader's `lm` feature scores with the fine-tuned model: list reader after finetune "
                         "(or drop `lm` from reader.features)")
    if "pretrain" in s and "tokenizer" not in s:
        raise ValueError("the pretrain stage needs the tokenizer stage (it trains on its token shards)")
    if {"tokenizer", "finetune", "rag"} & s and "data" not in s:
        raise ValueError("the rag, tokenizer and finetune stages need the data stage")
    if "desk" in s and "intents" not in s:
        raise ValueError("the desk stage serves the intent classifier: add the intents stage before it")
    if "bundle" in s and "rag" not in s:
        raise ValueError("the bundle stage packs the retrieval index: add the rag stage")
    if r.model is not None and not (Path(r.model) / "config.json").is_file():
        raise ValueError(f"model: {r.model} is not a Hugging Face model directory (no config.json); point "
                         "`model:` at a local checkpoint")


# --------------------------------------------------------------------------------------------- the bundle
def bundle_parts(r: Recipe, summaries: dict[str, Any]) -> dict[str, Any]:
    """What the served assistant is made of: model (+ adapter), index, ranker."""
    model, adapter = (st._finetuned_model(r, summaries) if {"finetune", "quantize"} & set(r.stages)
                      else (st.base_model_dir(r), None))
    # the model's own ranker (select mode), else the no-model one (a reader fit without the "lm" feature): the
    # bundle answers `--mode select` either way
    rankers = [r.run_path / "reader" / st.RANKERS[who]
               for who in ("finetuned" if "finetune" in r.stages else "base", "no_model")]
    ranker = next((p for p in rankers if "reader" in r.stages and p.is_file()), None)
    guard = st.section(r, "bundle").guard
    if guard:
        from lmstack.guard.policy import policy_path

        guard = policy_path(guard)
    return {"model": model, "adapter": adapter, "index": r.run_path / "rag" / "index.sqlite", "ranker": ranker,
            "guard": guard}


def bundle_settings(r: Recipe, b: cfg.BundleStage) -> dict[str, Any]:
    """The runtime settings the assistant was built and measured with (never flags for the user to copy)."""
    rag, ev = st.section(r, "rag"), st.section(r, "eval")
    return {"k": rag.k, "context_max_chars": rag.context_max_chars, "mode": b.mode, "max_tokens": b.max_tokens,
            "context": rag.context if st.units_context(r) else "passages", "units": rag.units,
            "copy_bias": ev.copy_bias, "copy_start_bias": ev.copy_start_bias, "copy_prior": ev.copy_prior,
            "cite": bool(rag.cite),
            "system_prompt": st.system_prompt(r), "embedder": rag.embedder if rag.dense else None,
            "dense_langs": list(rag.dense_langs), "recipe": r.name}


def run_bundle(ctx: StageContext) -> dict[str, Any]:
    from lmstack.apps.bundle import write_bundle

    b = write_bundle(ctx.out_dir, "support", bundle_parts(ctx.recipe, ctx.summaries),
                     bundle_settings(ctx.recipe, ctx.config), link=ctx.config.files == "link")
    ctx.log(f"{b.root}: " + ", ".join(f"{k} {v}" for k, v in b.parts.items() if v))
    return {"bundle": str(b.root), "parts": b.parts, "settings": {k: v for k, v in b.settings.items()
                                                                   if k != "system_prompt"},
            "files": len(b.files)}


APP = register_app(App(
    "support",
    description="Larkspur Home customer-support assistant: grounded in its knowledge base, EN + ZH",
    check=_check, summary=report.print_tables, report=report.html_sections, next_commands=report.next_commands,
    # rag.context: units -- the reader ranks the answer units the model is tuned on, so it runs before finetune
    alt_orders=(("data", "rag", "tokenizer", "base", "pretrain", "reader", "finetune", "quantize", "eval", "bundle",
                 "intents", "desk"),),
    stages=[
        Stage("data", st.run_data, config=cfg.DataStage, description="general corpus + shop knowledge base + support QA",
              depends=lambda r: {"python_stdlib": sys.version},
              inputs=lambda r: {"shop": dir_sha256(st._shop_dir(r)),
                                **{p: (dir_sha256(p) if Path(p).is_dir() else file_sha256(p) if Path(p).is_file()
                                       else "missing") for p in st.section(r, "data").general.inputs}},
              outputs=lambda c: [c.out_dir / n for n in ("general_train.jsonl", "heldout_text.jsonl", "shop_kb.jsonl",
                                                         "sft_train.jsonl", "heldout_qa.jsonl", "dev_qa.jsonl",
                                                         "heldout_reply.jsonl")],
              row=report.data_row),
        Stage("rag", st.run_rag, config=cfg.RagStage, deps=_deps("data"),
              description="index the shop KB (BM25; + embeddings with rag.dense); ground chats in passages",
              outputs=lambda c: [c.out_dir / n for n in ("index.sqlite", "sft_train.jsonl", "heldout_qa.jsonl",
                                                         "dev_qa.jsonl", "heldout_reply.jsonl")],
              row=report.rag_row),
        Stage("tokenizer", st.run_tokenizer, config=cfg.TokenizerStage, description="byte-level BPE + token shards",
              deps=lambda r: [n for n in ("data", "rag") if n in r.stages
                              and (n == "data" or st.section(r, "tokenizer").chat_repeat)],
              outputs=lambda c: [c.out_dir / "tokenizer" / "tokenizer.json", c.out_dir / "shards" / "index.json"],
              row=report.tokenizer_row),
        base_stage(description="the pretrained model the assistant starts from, imported from a GGUF file"),
        pretrain_stage(wire=lambda r: {"data": {"shards": str(r.run_path / "tokenizer" / "shards")}},
                       deps=_deps("tokenizer"), description="from scratch on the token shards"),
        finetune_stage(wire=lambda r: {"model": str(st.base_model_dir(r)),
                                       "data": {"path": str(st.qa_dir(r) / "sft_train.jsonl")}},
                       # reader: only when it runs first (rag.context: units) -- a fingerprint counts the deps
                       # that come earlier in the recipe
                       deps=_deps("data", "rag", "base", "pretrain", "reader"), description="SFT on the support chats"),
        quantize_stage(st.run_quantize, deps=_deps("base", "pretrain", "finetune"), inputs=_model_input,
                       description="the served model: the LoRA merged, the weights quantized (evaluated as served)"),
        Stage("reader", st.run_reader, config=cfg.ReaderStage,
              deps=_deps("data", "rag", "tokenizer", "base", "pretrain", "finetune", "quantize"),
              description="fit the answer ranker on dev questions (never the reported ones)",
              depends=lambda r: {"eval_subset": [st.section(r, "eval").heldout_limit],
                                 "embedder": st.section(r, "rag").embedder,
                                 "dense_langs": st.section(r, "rag").dense_langs,
                                 "compare_base": st.section(r, "eval").compare_base},
              inputs=_model_input, row=report.reader_row,
              outputs=lambda c: [c.out_dir / st.RANKERS["no_model"]]  # + the prompts it writes with context: units
              + ([c.out_dir / n for n in st.UNIT_PROMPTS if n != "heldout_reply.jsonl"] if st.units_context(c.recipe)
                 else [])),
        Stage("eval", st.run_eval, config=cfg.EvalStage,
              deps=_deps("data", "rag", "base", "pretrain", "finetune", "quantize", "reader"),
              description="held-out support questions, base vs fine-tuned; held-out perplexity",
              inputs=_model_input, outputs=lambda c: [c.out_dir], row=report.eval_row),
        Stage("bundle", run_bundle, config=cfg.BundleStage,
              deps=_deps("rag", "base", "pretrain", "finetune", "quantize", "reader"),
              description="the assistant in one directory: model, index, ranker, settings",
              depends=lambda r: bundle_settings(r, st.section(r, "bundle")), inputs=_model_input,
              outputs=lambda c: [c.out_dir / "manifest.json"],
              row=lambda m: f"{m.get('bundle')}: {m.get('files')} files"),
        # the support desk (recipes/support-desk.yaml; off unless a recipe lists them): intents, state, escalation
        Stage("intents", ds.run_intents, config=cfg.IntentsStage, description="the desk's intent classifier (EN + ZH)",
              depends=lambda r: {"orders": st.section(r, "desk").orders},
              inputs=lambda r: {"orders": file_sha256(ds.orders_path(st.section(r, "desk")))},
              outputs=lambda c: [c.out_dir / "model" / "config.json"],
              row=lambda m: f"held-out accuracy {m.get('accuracy')}, macro-F1 {m.get('macro_f1')} ({m.get('eval_records')} utterances)"),
        Stage("desk", ds.run_desk, config=cfg.DeskStage, deps=_deps("intents"),
              description="order database + held-out multi-turn dialogues",
              inputs=lambda r: {"orders": file_sha256(ds.orders_path(st.section(r, "desk")))},
              outputs=lambda c: [c.out_dir / "metrics.json", c.out_dir / "orders.sqlite"],
              row=lambda m: (f"task success {m.get('task_success')}; intent acc {m.get('intent_accuracy')}; slot acc "
                             f"{m.get('slot_accuracy')}; escalation P/R {m.get('escalation_precision')}/"
                             f"{m.get('escalation_recall')}")),
    ]))
