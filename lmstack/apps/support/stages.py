"""The support app's own stages, and how its recipe connects them to the library's pretrain / finetune stages:

=========  ==================================================================  =================================
stage      calls                                                               writes under runs/NAME/
=========  ==================================================================  =================================
data       data.stdlib_corpus, data.pipeline.run_pipeline (clean/dedup/PII on  data/ (general_train.jsonl,
           the general corpus), the shop KB, QA and splits (this app)          heldout_text.jsonl, shop_kb.jsonl,
                                                                               sft_train.jsonl, heldout_qa.jsonl)
rag        rag.build_index over the KB's chunks; chats and held-out questions  rag/ (index.sqlite, grounded
           grounded in retrieved passages                                      sft_train.jsonl, heldout_qa.jsonl)
tokenizer  tokenizer.train_tokenizer, data.shards.write_shards                 tokenizer/, shards/
pretrain   the library's stage (lmstack.pipeline.stages), on tokenizer/shards  pretrain/ (final/, loss.png, ...)
finetune   the library's stage, on the (grounded) support chats               finetune/ (final/, loss.png, ...)
reader     the answer ranker (reader.py) fit on dev questions                  reader/ (ranker.json, ...)
eval       eval.run_eval: held-out support questions (base vs fine-tuned),     eval/base/, eval/finetuned/
           perplexity on held-out general text; the assistant's selected
           answers
bundle     the served assistant in one directory (bundle.py)                   bundle/ (manifest.json, ...)
=========  ==================================================================  =================================

No stage re-implements a library: they fill in paths, pick the inputs and collect a summary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.pipeline import Recipe, StageContext
from lmstack.utils.io import iter_jsonl as read_jsonl, write_jsonl


def section(recipe: Recipe, name: str) -> Any:
    """The validated config of one of this app's stages (its defaults when the recipe has no such section)."""
    from lmstack.apps.support.pipeline import APP

    return APP.registry[name].configure(recipe)


def _shop_dir(recipe: Recipe) -> Path:
    """``data.shop.dir`` (relative to the working directory, else to the recipe file), else the shipped
    knowledge base next to the recipe (``recipes/data/shop``), else the one in the source checkout."""
    from lmstack.apps.support.kb import default_kb_dir

    here = Path(recipe.source).parent if recipe.source else None
    shop = section(recipe, "data").shop
    if shop.dir:
        p = Path(shop.dir).expanduser()
        if not p.is_absolute() and not p.exists() and here is not None and (here / p).exists():
            p = here / p
        return p
    if here is not None and (here / "data" / "shop" / "faq.yaml").is_file():
        return here / "data" / "shop"
    return default_kb_dir()


def system_prompt(recipe: Recipe) -> str:
    from lmstack.apps.support.dialogues import SYSTEM_PROMPT

    return section(recipe, "data").shop.system_prompt or SYSTEM_PROMPT


def _device(recipe: Recipe) -> str:
    """The recipe's device as a torch device string ("auto": cuda when available)."""
    from lmstack.utils.device import resolve_device

    return str(resolve_device(recipe.device))




def base_model_dir(recipe: Recipe) -> Path:
    """The model the app starts from: the recipe's ``model:``, else the model its ``base`` stage imported (a
    GGUF file: the practical track), else its pretrain stage's final model (the from-scratch track)."""
    if recipe.model is not None:
        return Path(recipe.model)
    if "base" in recipe.stages:
        return recipe.run_path / "base" / "model"
    return Path(section(recipe, "pretrain").run_dir) / "final" if "pretrain" in recipe.stages else \
        recipe.run_path / "pretrain" / "final"


def grounded_dir(recipe: Recipe) -> Path:
    """The support chats and held-out questions with their retrieved passages (the rag stage's), or bare."""
    return recipe.run_path / ("rag" if "rag" in recipe.stages else "data")


def units_context(recipe: Recipe) -> bool:
    """Whether prompts show the top answer units the reader ranks (``rag.context: units``) instead of passages."""
    return "rag" in recipe.stages and "reader" in recipe.stages and section(recipe, "rag").context == "units"


def qa_dir(recipe: Recipe) -> Path:
    """Where the prompts the model is tuned and evaluated on are read from: the reader stage's (answer units)
    with ``rag.context: units``, else :func:`grounded_dir`."""
    return recipe.run_path / "reader" if units_context(recipe) else grounded_dir(recipe)


def _heldout(key: str, seed: int, fraction: float) -> bool:
    d = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64 < fraction


def _clean_general(ctx: StageContext, raw: Path, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run lmstack.data's cleaning pipeline on the general corpus; return (kept documents, report)."""
    from lmstack.data.pipeline import run_pipeline

    r = ctx.config
    inputs = [{"path": str(raw), "name": "general"}] + [{"path": p} for p in r.general.inputs]
    cfg = {**r.clean, "inputs": inputs}
    report = run_pipeline(cfg, out)
    docs = []
    docs.extend(read_jsonl(report["output"]))  # run_pipeline's report: "output" is the merged JSONL
    return docs, report


HELDOUT_CHUNK = 2000  # held-out documents are cut into pieces of this many characters for perplexity


def _split_heldout(docs: list[dict[str, Any]], seed: int, fraction: float) -> tuple[list[dict], list[dict]]:
    """(training documents, held-out chunks): a seeded hash of each document's id picks the held-out ones
    (at least one when fraction > 0 and there are two or more); held-out documents are cut into chunks."""
    keys = [str(d.get("id") or d.get("source") or i) for i, d in enumerate(docs)]
    picked = {i for i, k in enumerate(keys) if _heldout(k, seed, fraction)}
    if not picked and fraction > 0 and len(docs) > 1:
        picked = {min(range(len(docs)), key=lambda i: hashlib.blake2b(f"{seed}:{keys[i]}".encode()).digest())}
    train = [d for i, d in enumerate(docs) if i not in picked]
    held = [{"text": docs[i]["text"][k:k + HELDOUT_CHUNK], "id": f"{keys[i]}@{k}"}
            for i in sorted(picked) for k in range(0, len(docs[i]["text"]), HELDOUT_CHUNK)]
    return train, held


def _read_inputs(ctx: StageContext, patterns: list[str]) -> list[dict[str, Any]]:
    """User text files as documents, read by lmstack.data's readers (bad records counted, not fatal)."""
    from lmstack.data.readers import ReadStats, expand_inputs, iter_file

    stats, out = ReadStats(), []
    for pat in patterns:
        for path, rel in expand_inputs(pat, where="data.general.inputs"):
            out.extend({"text": rec.text, "source": rec.id} for rec in iter_file(path, rel, Path(pat).stem, "text", stats))
    if sum(stats.problems.values()):
        ctx.log(f"skipped {sum(stats.problems.values())} bad records: {'; '.join(stats.examples[:3])}")
    return out


def run_data(ctx: StageContext) -> dict[str, Any]:
    from lmstack.apps.support import build_support_data, kb_documents, load_kb
    from lmstack.data.stdlib_corpus import stdlib_corpus

    r, out, seed = ctx.config, ctx.out_dir, ctx.recipe.seed
    out.mkdir(parents=True, exist_ok=True)
    kb = load_kb(_shop_dir(ctx.recipe))  # first: a broken KB fails before the slow work

    docs = stdlib_corpus(r.general.max_chars) if r.general.source == "stdlib" else []
    ctx.log(f"general corpus: {len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters "
            f"({r.general.source}{' + ' + str(len(r.general.inputs)) + ' inputs' if r.general.inputs else ''})")
    raw = out / "raw" / "general.jsonl"
    write_jsonl(raw, docs)
    report: dict[str, Any] = {}
    if r.clean_general and (docs or r.general.inputs):
        kept, report = _clean_general(ctx, raw, out / "clean")
    else:
        kept = docs + _read_inputs(ctx, r.general.inputs)
    train, held = _split_heldout(kept, seed, r.general.heldout_fraction)
    write_jsonl(out / "general_train.jsonl", train)
    write_jsonl(out / "heldout_text.jsonl", held)

    pages = kb_documents(kb)
    write_jsonl(out / "shop_kb.jsonl", pages)
    sup = build_support_data(kb, seed=seed, n_dialogues=r.shop.dialogues, system_prompt=system_prompt(ctx.recipe),
                             reply_repeat=r.shop.reply_repeat, faq_repeat=r.shop.faq_repeat)
    write_jsonl(out / "sft_train.jsonl", sup["train"])
    write_jsonl(out / "heldout_qa.jsonl", sup["heldout"])
    write_jsonl(out / "dev_qa.jsonl", sup["dev"])
    write_jsonl(out / "heldout_reply.jsonl", sup["reply"])
    ctx.log(f"shop: {len(pages)} pages, {len(sup['train'])} training chats, {len(sup['heldout'])} held-out "
            f"questions, {len(sup['dev'])} dev questions")
    return {
        "general_documents_in": len(docs), "general_chars_in": sum(len(d["text"]) for d in docs),
        "general_documents_kept": len(kept), "general_chars_kept": sum(len(d.get("text", "")) for d in kept),
        "general_train_documents": len(train), "heldout_text_chunks": len(held),
        "shop_pages": len(pages), "sft_examples": len(sup["train"]), "heldout_questions": len(sup["heldout"]),
        "dev_questions": len(sup["dev"]), "heldout_replies": len(sup["reply"]),
        "data_report": _report_path(out / "clean"),
        "steps": _step_table(report),
    }


def _report_path(clean: Path) -> str | None:
    for name in ("report.html", "report.json"):
        if (clean / name).is_file():
            return str(clean / name)
    return None


def _step_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-step documents in/out from the data pipeline's report (its ``steps``: StepStats dicts)."""
    from lmstack.data.steps import StepStats

    steps = [StepStats.from_dict(d) for d in report.get("steps", [])]
    return [{"name": s.name, "docs_in": s.docs_in, "docs_out": s.docs_out, "removed": dict(s.removed),
             "changed": dict(s.changed)} for s in steps]


# ------------------------------------------------------------------------------------------------------ rag
def retrieval_scores(rows: list[dict[str, Any]], ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, float]:
    """recall@k of the gold chunk over grounded held-out rows, overall and per language."""
    from lmstack.rag import recall_at_k

    out: dict[str, float] = {}
    groups = {"": rows, **{f"{lang}_": [r for r in rows if r["lang"] == lang] for lang in sorted({r["lang"] for r in rows})}}
    for prefix, rs in groups.items():
        for k in ks:
            out[f"{prefix}recall@{k}"] = round(recall_at_k([r["retrieved"] for r in rs], [r["gold"] for r in rs], k), 4)
    return out


def run_rag(ctx: StageContext) -> dict[str, Any]:
    """Index the shop's knowledge base (SQLite FTS5, BM25) and ground the support chats and held-out
    questions in retrieved passages (lmstack.apps.support.retrieval)."""
    import random

    from lmstack.apps.support import load_kb
    from lmstack.apps.support.retrieval import build_kb_index, ground_chat, ground_question, open_kb_retriever

    r, out, data = ctx.config, ctx.out_dir, ctx.stage_dir("data")
    out.mkdir(parents=True, exist_ok=True)
    kb = load_kb(_shop_dir(ctx.recipe))
    index = out / "index.sqlite"
    embedder = None
    if r.dense:
        from lmstack.rag.dense import load_embedder

        embedder = load_embedder(r.embedder, device=_device(ctx.recipe))
        embedder.lmstack_name = r.embedder  # the name the index records (and reloads it by)
    stats = build_kb_index(kb, index, faq_keywords=r.faq_keywords, policy_max_chars=r.policy_max_chars,
                           embedder=embedder, dense_langs=r.dense_langs)
    if r.dense:
        ctx.log(f"{stats['vectors']} passage embeddings ({r.embedder}, {', '.join(r.dense_langs)})")
    retriever = open_kb_retriever(index, embedder=embedder)
    rng = random.Random(ctx.recipe.seed) if r.shuffle_train else None
    n = write_jsonl(out / "sft_train.jsonl", (ground_chat(rec, retriever, r.k, rng, r.context_max_chars, r.cite)
                                              for rec in read_jsonl(data / "sft_train.jsonl")))
    held = [ground_question(row, retriever, r.k, r.context_max_chars) for row in read_jsonl(data / "heldout_qa.jsonl")]
    write_jsonl(out / "heldout_qa.jsonl", held)
    write_jsonl(out / "dev_qa.jsonl", (ground_question(row, retriever, r.k, r.context_max_chars)
                                       for row in read_jsonl(data / "dev_qa.jsonl")))
    if (data / "heldout_reply.jsonl").is_file():
        write_jsonl(out / "heldout_reply.jsonl", (ground_question(row, retriever, r.k, r.context_max_chars)
                                                  for row in read_jsonl(data / "heldout_reply.jsonl")))
    retriever.close()
    scores = retrieval_scores(held)
    ctx.log(f"{stats['chunks']} chunks indexed; held-out questions: recall@1 {scores['recall@1']:.3f}, "
            f"recall@{r.k} {scores.get(f'recall@{r.k}', float('nan')):.3f}")
    return {"index": str(index), "chunks": stats["chunks"], "k": r.k, "sft_examples": n, "dense": r.dense,
            "heldout_questions": len(held), "retrieval": scores}


# ----------------------------------------------------------------------------------------------- tokenizer
def run_tokenizer(ctx: StageContext) -> dict[str, Any]:
    from lmstack.data.shards import write_shards
    from lmstack.tokenizer import train_tokenizer

    r, data = ctx.config, ctx.stage_dir("data")
    general = [d["text"] for d in read_jsonl(data / "general_train.jsonl")]
    shop = [d["text"] for d in read_jsonl(data / "shop_kb.jsonl")]
    chats = [m["content"] for d in read_jsonl(data / "sft_train.jsonl") for m in d["messages"] if m["role"] != "system"]
    tok_dir = ctx.out_dir / "tokenizer"
    ctx.log(f"training a {r.vocab_size}-token byte-level BPE on {len(general) + len(shop)} documents + {len(chats)} chat turns")
    tok = train_tokenizer(general + shop + chats, vocab_size=r.vocab_size, out_dir=tok_dir, min_frequency=r.min_frequency)
    texts = general + shop * r.domain_repeat
    sources = [{"path": str(data / "general_train.jsonl"), "documents": len(general)},
               {"path": str(data / "shop_kb.jsonl"), "documents": len(shop) * r.domain_repeat}]
    if r.chat_repeat:
        chat_file = grounded_dir(ctx.recipe) / "sft_train.jsonl"
        rendered = [tok.apply_chat_template(rec["messages"]) for rec in read_jsonl(chat_file)]
        texts += rendered * r.chat_repeat
        sources.append({"path": str(chat_file), "documents": len(rendered) * r.chat_repeat})
        ctx.log(f"pretraining shards: + {len(rendered)} support chats x {r.chat_repeat} ({chat_file.parent.name}/)")
    index = write_shards(texts, tok, ctx.out_dir / "shards", val_fraction=r.val_fraction, seed=ctx.recipe.seed,
                         tokenizer_dir=str(tok_dir), progress_total=len(texts), sources=sources)
    n_train = index["splits"]["train"]["tokens"]
    n_val = index["splits"].get("val", {}).get("tokens", 0)
    n_chars = sum(len(t) for t in texts)
    return {"vocab_size": tok.vocab_size, "tokenizer_dir": str(tok_dir), "shards": str(ctx.out_dir / "shards"),
            "train_tokens": n_train, "val_tokens": n_val,
            "chars_per_token": round(n_chars / max(1, n_train + n_val), 3)}


# ---------------------------------------------------------------------------------------------------- eval
REPLY_METRICS = ["exact_match", "f1"]  # support_reply: the shop's greeting / refusal, word for word
GENERAL_METRICS = ["contains", "f1"]  # general_qa: the answer somewhere in the reply


def general_qa_path() -> Path:
    """The shipped general-knowledge check (recipes/data/general/general_qa.yaml), else the packaged copy."""
    from lmstack.apps.support.kb import default_kb_dir

    return default_kb_dir().parent / "general" / "general_qa.yaml"


def read_general_qa(src: Path) -> list[dict[str, Any]]:
    """Question rows of a general-knowledge check: ``{lang: [{q: question, a: answer or [answers]}]}``; a
    malformed file is one line naming it and the entry."""
    from lmstack.config import read_yaml

    doc = read_yaml(src, what="general QA set")
    if not isinstance(doc, dict) or not doc:
        raise DataError(f"{src}: expected a mapping of language -> list of {{q, a}} entries")
    rows = []
    for lang in sorted(doc):
        items = doc[lang]
        if not isinstance(items, list):
            raise DataError(f"{src}: {lang}: expected a list of {{q, a}} entries")
        for i, x in enumerate(items):
            a = x.get("a") if isinstance(x, dict) else None
            answers = [a] if isinstance(a, (str, int, float)) else a
            if not (isinstance(x, dict) and isinstance(x.get("q"), str) and x["q"].strip() and isinstance(answers, list)
                    and answers and all(isinstance(y, (str, int, float)) for y in answers)):
                raise DataError(f"{src}: {lang}[{i}]: expected {{q: question, a: answer or [answers]}}")
            rows.append({"question": x["q"], "answer": [str(y) for y in answers], "lang": str(lang),
                         "id": f"general/{lang}#{i}", "messages": [{"role": "user", "content": x["q"]}]})
    return rows


def eval_tasks(recipe: Recipe, out: Path, tokenizer_dir: Path) -> list[dict[str, Any]]:
    """Task dicts for lmstack.eval: held-out support QA, held-out greetings / out-of-scope questions, the
    general-knowledge check and held-out text perplexity.

    The support prompts are the conversation (system prompt + passages + held-out question) rendered by the
    model's own chat template through :meth:`lmstack.tokenizer.Tokenizer.apply_chat_template` -- exactly what
    ``lmstack chat`` sends -- and stored in the task data, so every model is asked in the format it was tuned
    on. The general questions are asked with no system prompt at all: what the model knows on its own."""
    from lmstack.apps.support import sample_heldout
    from lmstack.apps.support.retrieval import CITATION
    from lmstack.tokenizer import Tokenizer

    r = section(recipe, "eval")
    data = recipe.run_path / "data"
    tok = Tokenizer.from_dir(tokenizer_dir)
    remove = [CITATION.pattern] if "rag" in recipe.stages and section(recipe, "rag").cite else []

    copy = "rag" in recipe.stages and bool(r.copy_bias or r.copy_start_bias)
    cite = copy and bool(section(recipe, "rag").cite)  # quotes run on into their passage's citation marker
    retriever = prior = None
    if copy:  # grounded decoding: each question's quotable texts, as the assistant builds them live
        from lmstack.apps.support.retrieval import open_kb_retriever

        retriever = open_kb_retriever(recipe.run_path / "rag" / "index.sqlite", embedder=None)
        if r.copy_prior:  # reader-guided: weighed by the no-model ranker, as the bundled assistant weighs them
            ranker = recipe.run_path / "reader" / RANKERS["no_model"]
            if "reader" not in recipe.stages or not ranker.is_file():
                raise DataError("eval.copy_prior weighs the quotable texts with the reader stage's no-model ranker: "
                                "add the reader stage before eval, or set eval.copy_prior: 0")
            from lmstack.apps.support.assistant import unit_reader

            prior = unit_reader(ranker)

    def quote(x: dict[str, Any]) -> dict[str, Any]:
        if retriever is None:
            return {}
        from lmstack.apps.support.reader import quote_texts

        hits = _grounded_hits(retriever, x.get("context") or [])
        if x.get("units") and len(x["units"]) == len(hits):  # context: units -- the units shown, not their passages
            import dataclasses

            hits = [dataclasses.replace(h, chunk=dataclasses.replace(h.chunk, text=t)) for h, t in zip(hits, x["units"])]
        texts, weights = quote_texts(hits, x["question"], lang=x["lang"], prior=prior, weight=r.copy_prior, cite=cite)
        return {"quote": texts if weights is None else {"texts": texts, "weights": weights}}

    def asked(rows: list[dict[str, Any]], path: Path) -> Path:
        write_jsonl(path, ({"question": x["question"], "answer": x["answer"], "lang": x["lang"], "id": x["id"],
                            "prompt": tok.apply_chat_template(x["messages"], add_generation_prompt=True), **quote(x)}
                           for x in rows))
        return path

    grounded = {"copy_field": "quote", "copy_bias": r.copy_bias, "copy_start_bias": r.copy_start_bias} if copy else {}

    rows = list(read_jsonl(qa_dir(recipe) / "heldout_qa.jsonl"))
    qa_path = asked(sample_heldout(rows, r.heldout_limit, seed=recipe.seed), out / "support_heldout.jsonl")
    tasks: list[dict[str, Any]] = [{
        "type": "generation", "name": "support_heldout", "data": str(qa_path.resolve()), "prompt": "{{ prompt }}",
        "max_tokens": r.max_tokens, "stop": ["\n"], "metrics": r.metrics, "remove": remove, **grounded,
        "description": "held-out paraphrases of Larkspur Home support questions (never seen in training)"}]
    reply = qa_dir(recipe) / "heldout_reply.jsonl"
    if r.replies and reply.is_file():
        path = asked(list(read_jsonl(reply)), out / "support_reply.jsonl")
        tasks.append({"type": "generation", "name": "support_reply", "data": str(path.resolve()),
                      "prompt": "{{ prompt }}", "max_tokens": r.max_tokens, "stop": ["\n"], "remove": remove,
                      "metrics": REPLY_METRICS, **grounded,
                      "description": "held-out greetings and out-of-scope questions: greet or decline as the shop "
                                     "says"})
    if r.general_qa:
        src = Path(r.general_qa) if r.general_qa != "shipped" else general_qa_path()
        path = asked(read_general_qa(src), out / "general_qa.jsonl")
        tasks.append({"type": "generation", "name": "general_qa", "data": str(path.resolve()), "prompt": "{{ prompt }}",
                      "max_tokens": r.general_max_tokens, "stop": ["\n"], "metrics": GENERAL_METRICS,
                      "description": f"general knowledge, asked without the shop's prompt ({src.name})"})
    text = data / "heldout_text.jsonl"
    if r.perplexity and text.is_file() and text.stat().st_size > 0:
        tasks.append({"type": "perplexity", "name": "heldout_text_ppl", "data": str(text.resolve()),
                      "max_length": r.ppl_max_length, "stride": r.ppl_max_length, "limit": r.ppl_limit,
                      "description": "general text held out of pretraining"})
    return tasks + list(r.tasks)


def _task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: t.get("metrics", {}) for name, t in results.get("tasks", {}).items()}


def per_language(out: Path, metrics: list[str], task: str = "support_heldout") -> dict[str, dict[str, float]]:
    """A generation task's metrics per language, rescored from the saved predictions (``out/samples``)."""
    from lmstack.eval.generation import score_generation

    qa = out.parent / f"{task}.jsonl"
    samples = out / "samples" / f"{task}.jsonl"
    if not (qa.is_file() and samples.is_file()):
        return {}
    asked = list(read_jsonl(qa))
    preds = list(read_jsonl(samples))
    res: dict[str, dict[str, float]] = {}
    for lang in sorted({r["lang"] for r in asked}):
        idx = [i for i, x in enumerate(asked) if x["lang"] == lang and i < len(preds)]
        res[lang] = score_generation([preds[i]["prediction"] for i in idx], [preds[i]["references"] for i in idx],
                                     metrics)
    return res


def citation_accuracy(recipe: Recipe, out: Path) -> dict[str, float]:
    """Of the support answers that end with a citation (``[n]``), the share citing a passage that states the
    reference answer (whitespace aside), overall and per language; and the share of answers citing at all."""
    from lmstack.apps.support.retrieval import citation_numbers, open_kb_retriever, states

    samples = out / "samples" / "support_heldout.jsonl"
    if not samples.is_file():
        return {}
    grounded = {r["id"]: r for r in read_jsonl(qa_dir(recipe) / "heldout_qa.jsonl")}
    asked = list(read_jsonl(out.parent / "support_heldout.jsonl"))
    retriever = open_kb_retriever(recipe.run_path / "rag" / "index.sqlite", embedder=None)
    rows: list[tuple[str, bool, bool]] = []
    for q, p in zip(asked, read_jsonl(samples)):
        nums = citation_numbers(p.get("raw", p["prediction"]))
        g = grounded[q["id"]]
        shown = g["units"] if "units" in g else [getattr(retriever.get(c), "text", None) for c in g["context"]]
        ok = bool(nums) and all(0 < n <= len(shown) and shown[n - 1] is not None
                                and states(shown[n - 1], q["answer"]) for n in nums)
        rows.append((q["lang"], bool(nums), ok))
    retriever.close()
    res: dict[str, float] = {}
    for lang in ["", *sorted({r[0] for r in rows})]:
        sub = [r for r in rows if not lang or r[0] == lang]
        cited = [r for r in sub if r[1]]
        res[f"{lang + '_' if lang else ''}cited"] = round(len(cited) / max(1, len(sub)), 4)
        res[f"{lang + '_' if lang else ''}citation_correct"] = round(sum(r[2] for r in cited) / max(1, len(cited)), 4)
    return res


# -------------------------------------------------------------------------------------------------- reader
RANKERS = {"finetuned": "ranker.json", "base": "base.json", "no_model": "no_model.json"}


def _grounded_hits(retriever: Any, context_ids: list[str]) -> list[Any]:
    from lmstack.rag import Hit

    return [Hit(c, 0.0, i + 1) for i, c in enumerate(filter(None, map(retriever.get, context_ids)))]


def _eval_subset_ids(recipe: Recipe) -> set[str]:
    """The held-out questions the eval stage reports (the reader stage fits on the others)."""
    from lmstack.apps.support import sample_heldout

    rows = list(read_jsonl(grounded_dir(recipe) / "heldout_qa.jsonl"))
    return {r["id"] for r in sample_heldout(rows, section(recipe, "eval").heldout_limit, seed=recipe.seed)}


def _finetuned_model(recipe: Recipe, summaries: dict[str, Any]) -> tuple[Path, Path | None]:
    """(model dir, adapter dir or None) of the fine-tuned model the assistant serves: the quantize stage's
    directory (adapter merged, weights quantized) when the recipe has that stage, else the fine-tuning result."""
    if "quantize" in recipe.stages:
        return Path((summaries.get("quantize") or {}).get("model_dir") or recipe.run_path / "quantize" / "model"), None
    return _tuned_float(recipe, summaries)


def _tuned_float(recipe: Recipe, summaries: dict[str, Any]) -> tuple[Path, Path | None]:
    """(model dir, adapter dir or None) of the fine-tuning result itself."""
    final = Path((summaries.get("finetune") or {}).get("final_dir") or recipe.run_path / "finetune" / "final")
    if (final / "adapter_config.json").is_file():
        return base_model_dir(recipe), final
    return final, None


def run_quantize(ctx: StageContext) -> dict[str, Any]:
    """The served model: the fine-tuned one (its LoRA merged) quantized, or the base model when nothing was tuned."""
    from lmstack.pipeline.stages import quantize_model

    r = ctx.recipe
    model, adapter = _tuned_float(r, ctx.summaries) if "finetune" in r.stages else (base_model_dir(r), None)
    res = quantize_model(model, adapter, ctx.out_dir / "model", ctx.config)
    ctx.log(f"{res['method']}: {res['float_mb']} MB -> {res['quantized_mb']} MB ({ctx.out_dir / 'model'})")
    return res


def run_reader(ctx: StageContext) -> dict[str, Any]:
    """Fit the assistant's answer ranker (lmstack.apps.support.reader) on dev questions: held-out questions
    that the eval stage does not report. One ranker per model (fine-tuned: ``ranker.json``, the one the
    assistant uses; base: ``base.json``) and one without the model (``no_model.json``: retrieval, overlap
    and embeddings alone), so the evaluation shows what the model adds."""
    import random

    from lmstack.apps.support.reader import Reader, candidate_set
    from lmstack.eval.lm import EvalLM
    from lmstack.apps.support.retrieval import open_kb_retriever
    from lmstack.rag.rerank import LinearRanker
    from lmstack.tokenizer import Tokenizer
    from lmstack.utils.progress import progress

    recipe, out, r = ctx.recipe, ctx.out_dir, ctx.config
    out.mkdir(parents=True, exist_ok=True)
    reported = _eval_subset_ids(recipe)
    # dev: the FAQ dev paraphrases, held-out greetings / out-of-scope questions, and the held-out questions the
    # eval stage does not report (mostly product questions)
    dev = list(read_jsonl(grounded_dir(recipe) / "dev_qa.jsonl"))
    dev += [q for q in read_jsonl(grounded_dir(recipe) / "heldout_qa.jsonl") if q["id"] not in reported]
    if r.dev_limit is not None and len(dev) > r.dev_limit:
        dev = sorted(random.Random(recipe.seed).sample(dev, r.dev_limit), key=lambda q: q["id"])
    if not dev:
        raise DataError("reader: no dev question to fit the answer ranker on; lower eval.heldout_limit or remove "
                        "the reader stage")
    feats = [f for f in r.features if f != "dense" or r.dense]
    embedder = None
    if "dense" in feats:
        from lmstack.rag.dense import load_embedder

        embedder = load_embedder(section(recipe, "rag").embedder, device=_device(recipe))
    retriever = open_kb_retriever(recipe.run_path / "rag" / "index.sqlite", embedder=None)
    base = base_model_dir(recipe)
    tok = Tokenizer.from_dir(base)
    cands = [candidate_set(_grounded_hits(retriever, q["context"]), q["lang"]) for q in dev]
    retriever.close()
    prompts = [tok.apply_chat_template(q["messages"], add_generation_prompt=True) for q in dev]
    golds = [[i for i, c in enumerate(cs) if c.text.strip() == q["answer"].strip()] for q, cs in zip(dev, cands)]
    plain = Reader(None, LinearRanker({}), embedder, section(recipe, "rag").dense_langs)
    rows = [plain.features(p, q["question"], cs, names=[f for f in feats if f != "lm"])
            for p, q, cs in zip(prompts, dev, cands)]
    # each (language, FAQ | product) kind of question counts as much as in the reported evaluation, which
    # balances them (the dev questions left over are mostly product questions)
    kind = [(q["lang"], q["id"].split("/", 1)[0]) for q in dev]
    gw = [1.0 / kind.count(x) for x in kind]
    info = {"dev_questions": len(dev), "embedder": section(recipe, "rag").embedder if embedder is not None else None,
            "dense_langs": list(section(recipe, "rag").dense_langs)}
    summary: dict[str, Any] = {"dev_questions": len(dev), "answer_in_candidates": round(
        sum(bool(g) for g in golds) / len(dev), 4), "features": feats}
    fitted = {"no_model": LinearRanker.fit(list(zip(rows, golds)), [f for f in feats if f != "lm"], r.l2,
                                           {**info, "model": None}, gw)}
    models: list[tuple[str, Path, Path | None]] = []
    if "lm" in feats:
        if "finetune" in recipe.stages:
            models.append(("finetuned", *_finetuned_model(recipe, ctx.summaries)))
        if section(recipe, "eval").compare_base or "finetune" not in recipe.stages:
            models.append(("base", base, None))
    for who, model, adapter in models:
        reader = Reader(EvalLM.load(model, adapter=adapter), LinearRanker({"lm": 1.0}))
        with_lm = []
        with progress() as prog:
            task = prog.add_task(f"reader: {who} model's likelihoods", total=len(dev))
            for i, (p, q, cs) in enumerate(zip(prompts, dev, cands)):
                lm = reader.scores(p, [c.text for c in cs]) if cs else []
                with_lm.append([{**row, "lm": x} for row, x in zip(rows[i], lm)])
                prog.advance(task)
        fitted[who] = LinearRanker.fit(list(zip(with_lm, golds)), feats, r.l2,
                                       {**info, "model": str(adapter or model)}, gw)
        del reader
    if units_context(recipe):  # the prompts of every later stage: the no-model ranker's top answer units
        summary["units"] = write_unit_prompts(recipe, out, Reader(None, fitted["no_model"], embedder,
                                                                  section(recipe, "rag").dense_langs), reported)
        ctx.log(f"answer-unit prompts: {summary['units']}")
    for who, ranker in fitted.items():
        ranker.save(out / RANKERS[who])
        summary[who] = {"dev_accuracy": round(ranker.info["accuracy"], 4),
                        "weights": {k: round(v, 3) for k, v in ranker.weights.items()}}
        ctx.log(f"{who}: dev accuracy {ranker.info['accuracy']:.3f}; weights "
                + ", ".join(f"{k} {v:+.2f}" for k, v in ranker.weights.items()))
    return summary


UNIT_PROMPTS = ("sft_train.jsonl", "heldout_qa.jsonl", "dev_qa.jsonl", "heldout_reply.jsonl")


def write_unit_prompts(recipe: Recipe, out: Path, reader: Any, asked: set[str]) -> dict[str, Any]:
    """``rag.context: units``: the rag stage's grounded chats and questions re-grounded in the top
    ``rag.units`` answer units (lmstack.apps.support.reader.ground_units), written to ``out`` under the same
    names; returns how often the unit that answers is shown, and first, for the held-out questions ``asked``
    (the ones the eval stage reports)."""
    from lmstack.apps.support.reader import ground_units
    from lmstack.apps.support.retrieval import open_kb_retriever, states

    rag, src = section(recipe, "rag"), grounded_dir(recipe)
    retriever = open_kb_retriever(recipe.run_path / "rag" / "index.sqlite", embedder=None)
    stats: dict[str, Any] = {"units": rag.units}
    try:
        for name in UNIT_PROMPTS:
            if not (src / name).is_file():
                continue
            rows = [ground_units(r, reader, retriever, rag.units, system_prompt(recipe), cite=rag.cite)
                    for r in read_jsonl(src / name)]
            write_jsonl(out / name, rows)
            if name == "heldout_qa.jsonl":
                sub = [r for r in rows if r["id"] in asked]
                stats["heldout_answer_shown"] = round(sum(any(states(u, r["answer"]) for u in r["units"])
                                                          for r in sub) / max(1, len(sub)), 4)
                stats["heldout_answer_first"] = round(sum(bool(r["units"]) and states(r["units"][0], r["answer"])
                                                          for r in sub) / max(1, len(sub)), 4)
    finally:
        retriever.close()
    return stats


def select_eval(recipe: Recipe, out: Path, model: Path | None, adapter: Path | None, who: str,
                embedder: Any = "auto") -> dict[str, Any]:
    """The assistant's default answers (lmstack.apps.support.reader: the candidate passage sentence the ranker
    scores highest) on the held-out questions asked, scored like the generation task; samples under
    ``out/who``. The ranker is the reader stage's for ``who`` (without a reader stage: the likelihood alone);
    ``embedder``: a loaded sentence embedder shared by the calls, or "auto" (Reader.load loads it)."""
    from lmstack.apps.support.reader import Reader
    from lmstack.eval.generation import score_generation
    from lmstack.apps.support.retrieval import open_kb_retriever

    retriever = open_kb_retriever(recipe.run_path / "rag" / "index.sqlite", embedder=None)
    grounded = {r["id"]: r for r in read_jsonl(recipe.run_path / "rag" / "heldout_qa.jsonl")}
    ranker = recipe.run_path / "reader" / RANKERS[who] if "reader" in recipe.stages else None
    reader = Reader.load(model, adapter=adapter, ranker=ranker, embedder=embedder)
    asked = list(read_jsonl(out / "support_heldout.jsonl"))
    rows = []
    for q in asked:
        hits = _grounded_hits(retriever, grounded[q["id"]]["context"])
        rows.append({"id": q["id"], "lang": q["lang"], "prediction": reader.answer(q["prompt"], q["question"], hits),
                     "references": [q["answer"]]})
    retriever.close()
    write_jsonl(out / who / "samples" / "support_select.jsonl", rows)
    metrics = section(recipe, "eval").metrics
    res = {"all": score_generation([r["prediction"] for r in rows], [r["references"] for r in rows], metrics)}
    for lang in sorted({r["lang"] for r in rows}):
        sub = [r for r in rows if r["lang"] == lang]
        res[lang] = score_generation([r["prediction"] for r in sub], [r["references"] for r in sub], metrics)
    return res


def _by_language(recipe: Recipe, summary: dict[str, Any], who: str, out: Path, ev: Any) -> None:
    summary[f"{who}_by_lang"] = per_language(out, ev.metrics)
    for task, metrics in (("support_reply", REPLY_METRICS), ("general_qa", GENERAL_METRICS)):
        by = per_language(out, metrics, task)
        if by:
            summary.setdefault(f"{who}_by_task_lang", {})[task] = by
    if "rag" in recipe.stages and section(recipe, "rag").cite:
        summary.setdefault(who, {})["citations"] = citation_accuracy(recipe, out)


def run_eval(ctx: StageContext) -> dict[str, Any]:
    from lmstack.eval.run import run_eval as eval_run
    from lmstack.serve.evaluation import generate

    recipe, out, ev = ctx.recipe, ctx.out_dir, ctx.config
    out.mkdir(parents=True, exist_ok=True)
    base = base_model_dir(recipe)
    tasks = eval_tasks(recipe, out, base)
    summary: dict[str, Any] = {"tasks": [t["name"] if isinstance(t, dict) else str(t) for t in tasks]}
    ft = ctx.summaries.get("finetune") or {}
    if "finetune" in recipe.stages:
        final = Path(ft.get("final_dir") or recipe.run_path / "finetune" / "final")
        if (final / "adapter_config.json").is_file():
            res = eval_run(base, tasks, out / "finetuned", adapter=final, engine=generate)
        else:
            res = eval_run(final, tasks, out / "finetuned", engine=generate)
        summary["finetuned"] = _task_metrics(res)
        _by_language(recipe, summary, "finetuned", out / "finetuned", ev)
    if ev.compare_base or "finetune" not in recipe.stages:
        res = eval_run(base, tasks, out / "base", engine=generate)
        summary["base"] = _task_metrics(res)
        _by_language(recipe, summary, "base", out / "base", ev)
    if "rag" in recipe.stages and ev.select:  # the assistant's default, grounded answers
        runs: list[tuple[str, Path | None, Path | None]] = []
        # the model's own ranker only when the reader scores with it ("lm" feature); else the no-model one alone
        with_lm = "reader" not in recipe.stages or "lm" in section(recipe, "reader").features
        if "finetune" in recipe.stages and with_lm:
            runs.append(("finetuned", *_finetuned_model(recipe, ctx.summaries)))
        if (ev.compare_base or "finetune" not in recipe.stages) and with_lm:
            runs.append(("base", base, None))
        if "reader" in recipe.stages and (recipe.run_path / "reader" / RANKERS["no_model"]).is_file():
            runs.append(("no_model", None, None))
        embedder: Any = "auto"
        if "reader" in recipe.stages and section(recipe, "reader").dense and "dense" in section(recipe, "reader").features:
            from lmstack.rag.dense import load_embedder  # once for the three rankers, as the reader stage did

            embedder = load_embedder(section(recipe, "rag").embedder, device=_device(recipe))
        for who, model, adapter in runs:
            sel = select_eval(recipe, out, model, adapter, who, embedder)
            summary.setdefault(who, {})["support_select"] = sel.pop("all")
            for lang, m in sel.items():
                summary.setdefault(f"{who}_by_lang", {}).setdefault(lang, {}).update(
                    {f"select_{k}": v for k, v in m.items()})
    if "rag" in recipe.stages:  # retrieval recall on exactly the questions asked
        asked = {r["id"] for r in read_jsonl(out / "support_heldout.jsonl")}
        rows = [r for r in read_jsonl(recipe.run_path / "rag" / "heldout_qa.jsonl") if r["id"] in asked]
        summary["retrieval"] = retrieval_scores(rows)
    return summary


