"""The support app's part of the summary and of ``report.html``: its stage rows, the evaluation table (no
model / base / fine-tuned), the answer ranker, sample answers side by side, and the commands to talk to the
bundle. The frame (title, stage table, loss plots, next commands) is the runner's (lmstack.pipeline.report)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from lmstack.pipeline.report import fmt, table
from lmstack.pipeline.runner import PipelineResult

HEADLINE = {"support_heldout": ("rougeL", "exact_match", "f1", "chrf"),
            "support_select": ("rougeL", "exact_match", "f1", "chrf"),
            "heldout_text_ppl": ("perplexity", "bits_per_byte")}
WHOS = ("no_model", "base", "finetuned")
EVAL_COLUMNS = ("task", "metric", "no model", "base", "fine-tuned")


def data_row(m: dict[str, Any]) -> str:
    return (f"general {fmt(m.get('general_documents_kept'))}/{fmt(m.get('general_documents_in'))} docs kept "
            f"({fmt(m.get('general_chars_kept'))} chars); {fmt(m.get('shop_pages'))} shop pages; "
            f"{fmt(m.get('sft_examples'))} chats; {fmt(m.get('heldout_questions'))} held-out questions")


def rag_row(m: dict[str, Any]) -> str:
    ret, k = m.get("retrieval") or {}, m.get("k")
    return (f"{fmt(m.get('chunks'))} chunks indexed; {fmt(m.get('sft_examples'))} grounded chats; held-out "
            f"recall@1 {fmt(ret.get('recall@1'))}, recall@{k} {fmt(ret.get(f'recall@{k}'))}")


def tokenizer_row(m: dict[str, Any]) -> str:
    return (f"vocab {fmt(m.get('vocab_size'))}; {fmt(m.get('train_tokens'))} train / "
            f"{fmt(m.get('val_tokens'))} val tokens; {fmt(m.get('chars_per_token'))} chars/token")


def reader_row(m: dict[str, Any]) -> str:
    return f"answer ranker fit on {fmt(m.get('dev_questions'))} dev questions; dev accuracy " + ", ".join(
        f"{who} {fmt((m.get(who) or {}).get('dev_accuracy'))}" for who in WHOS if m.get(who))


def eval_row(m: dict[str, Any]) -> str:
    parts = []
    for who in WHOS:
        for task in ("support_select", "support_heldout"):
            qa = (m.get(who) or {}).get(task, {})
            if qa:
                parts.append(f"{who} {task.split('_')[1]}: ROUGE-L {fmt(qa.get('rougeL'))} "
                             f"F1 {fmt(qa.get('f1'))} EM {fmt(qa.get('exact_match'))}")
    return "; ".join(parts)


def eval_rows(res: PipelineResult) -> list[tuple[str, str, str, str, str]]:
    """(task, metric, no model, base, fine-tuned) for the headline metrics; "no model" is the assistant's
    answer ranker without the model's likelihood (retrieval, overlap, embeddings), when the run has one."""
    m = res.summary("eval")
    by = {w: m.get(w) or {} for w in WHOS}
    rows = []
    for task in sorted(set().union(*by.values())):
        keys = HEADLINE.get(task) or sorted(set().union(*(by[w].get(task, {}) for w in WHOS)))
        for k in keys:
            vals = [by[w].get(task, {}).get(k) for w in WHOS]
            if any(v is not None for v in vals):
                rows.append((task, k, *map(fmt, vals)))
    lang_by = {w: m.get(f"{w}_by_lang") or {} for w in WHOS}
    for task, prefix in (("support_select", "select_"), ("support_heldout", "")):
        for lang in sorted(set().union(*lang_by.values())):
            for k in HEADLINE["support_heldout"]:
                vals = [lang_by[w].get(lang, {}).get(prefix + k) for w in WHOS]
                if any(v is not None for v in vals):
                    rows.append((f"{task} ({lang})", k, *map(fmt, vals)))
    task_by = {w: m.get(f"{w}_by_task_lang") or {} for w in WHOS}
    for task in ("support_reply", "general_qa"):
        langs = sorted(set().union(*(task_by[w].get(task, {}) for w in WHOS)))
        for lang in langs:
            keys = sorted(set().union(*(task_by[w].get(task, {}).get(lang, {}) for w in WHOS)))
            for k in keys:
                rows.append((f"{task} ({lang})", k, *map(fmt, (task_by[w].get(task, {}).get(lang, {}).get(k)
                                                                for w in WHOS))))
    ret = m.get("retrieval") or {}
    label = "retrieval (BM25 + dense)" if res.summary("rag").get("dense") else "retrieval (BM25)"
    for k, v in ret.items():  # the same passages for every column: one number
        if not k.startswith(("en_", "zh_")) or k.endswith(("@1", "@3")):
            rows.append((label, k, fmt(v), fmt(v), fmt(v)))
    return rows


def print_tables(res: PipelineResult, console: Any) -> None:
    from rich.table import Table

    if res.summary("desk"):
        t = Table(title="support desk: held-out dialogues")
        t.add_column("figure")
        t.add_column("value")
        for r in desk_rows(res.summary("desk")):
            t.add_row(*r)
        console.print(t)
    rows = eval_rows(res)
    if rows:
        e = Table(title="evaluation (held-out)")
        for c in EVAL_COLUMNS:
            e.add_column(c, justify="left" if c in ("task", "metric") else "right")
        for row in rows:
            e.add_row(*row)
        console.print(e)


def next_commands(res: PipelineResult) -> list[str]:
    """Talk to the bundle (it carries the model, index, ranker, k and system prompt: no other flag)."""
    b = res.summary("bundle").get("bundle") or (str(res.run_dir / "bundle") if "bundle" in res.recipe.stages else None)
    desk = [f"lmstack support desk {res.run_dir / 'desk'}"] if "desk" in res.recipe.stages else []
    if not b and desk and not {"finetune", "pretrain", "base"} & set(res.recipe.stages) and not res.recipe.model:
        return desk  # a desk-only recipe (recipes/support-desk.yaml)
    if b:
        return [f"lmstack support chat {b} --show-context",
                f"lmstack support serve {b} --port 8000   # OpenAI API; web chat at http://127.0.0.1:8000"]
    run, recipe = res.run_dir, res.recipe
    ft = res.summary("finetune").get("final_dir")
    base = str(Path(recipe.model)) if recipe.model else str(run / "pretrain" / "final")
    if ft and (Path(ft) / "adapter_config.json").is_file():
        target = f"--model {base} --adapter {ft}"
    else:
        target = f"--model {ft or base}"
    return [f"lmstack chat {target} --temperature 0",
            f"lmstack serve {target} --port 8000   # OpenAI API; web chat at http://127.0.0.1:8000"]


def _samples(run: Path, n: int = 10) -> list[tuple[str, ...]]:
    """Side by side: question, reference, base answer, fine-tuned answer (as written, citation included), whether
    the fine-tuned one is right, and the assistant's selected answer when the run has one. Half right and half
    wrong answers when there are both (good and bad, not a showcase), spread over the set (EN and ZH, FAQ and
    product questions)."""
    from lmstack.eval.metrics import exact_match

    def load(who: str, task: str = "support_heldout") -> list[dict[str, Any]]:
        p = run / "eval" / who / "samples" / f"{task}.jsonl"
        if not p.is_file():
            return []
        return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]

    qa = run / "eval" / "support_heldout.jsonl"
    qs = [json.loads(x) for x in qa.read_text(encoding="utf-8").splitlines() if x.strip()] if qa.is_file() else []
    base, ft, sel = load("base"), load("finetuned"), load("finetuned", "support_select")
    ok = [bool(i < len(ft) and exact_match(ft[i]["prediction"], q["answer"])) for i, q in enumerate(qs)]

    def spread(idx: list[int], k: int) -> list[int]:
        return [idx[int(j * len(idx) / k)] for j in range(k)] if len(idx) > k else idx

    right, wrong = [i for i in range(len(qs)) if ok[i]], [i for i in range(len(qs)) if not ok[i]]
    half = min(len(right), n // 2) if wrong else min(len(right), n)
    picks = sorted(spread(right, half) + spread(wrong, n - half)) if ft else spread(list(range(len(qs))), n)
    rows = []
    for i in picks:
        q = qs[i]
        row = (q["question"], q["answer"], base[i].get("raw", base[i]["prediction"]) if i < len(base) else "-",
               ft[i].get("raw", ft[i]["prediction"]) if i < len(ft) else "-", "yes" if ok[i] else "no")
        rows.append(row + ((sel[i]["prediction"] if i < len(sel) else "-",) if sel else ()))
    return rows


def desk_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """The desk's measured figures (held-out dialogues; the intent classifier on held-out utterances)."""
    clf = m.get("intent_classifier") or {}
    rows = [(f"intent classifier {k.replace('_', ' ')}", fmt(clf.get(k))) for k in
            ("accuracy", "macro_f1", "accuracy_en", "accuracy_zh") if clf.get(k) is not None]
    rows += [(k.replace("_", " "), fmt(m.get(k))) for k in
             ("dialogues", "intent_accuracy", "slot_accuracy", "task_success", "escalation_precision",
              "escalation_recall", "answer_correctness")]
    rows += [(f"task success: {k}", fmt(v)) for k, v in (m.get("task_success_by_scenario") or {}).items()]
    return rows


def html_sections(res: PipelineResult) -> list[str]:
    run, recipe = res.run_dir, res.recipe
    parts: list[str] = []
    if res.summary("desk"):
        parts += ["<h2>Support desk (held-out dialogues)</h2>", table(["figure", "value"], desk_rows(res.summary("desk")))]
    data = res.summary("data")
    if data:
        rows = [(k, fmt(v)) for k, v in data.items() if not isinstance(v, (dict, list)) and k != "data_report"]
        parts += ["<h2>Data</h2>", table(["figure", "value"], rows)]
        steps = data.get("steps") or []
        if steps:
            keys = sorted({k for s in steps for k in s}, key=lambda k: (k != "name", k != "step", k))
            parts.append(table(keys, [[fmt(s.get(k)) for k in keys] for s in steps]))
        if data.get("data_report"):
            rel = os.path.relpath(data["data_report"], run)
            parts.append(f"<p>Full data report: <a href='{html.escape(rel)}'>{html.escape(rel)}</a></p>")
    ev = eval_rows(res)
    if ev:
        parts += ["<h2>Evaluation</h2>", "<p>Held-out support questions are paraphrases that never appear in "
                  "training; the reference is the knowledge base's answer. Perplexity is on general text held out "
                  "of pretraining."
                  + (" Both models are asked with the same retrieved passages in the prompt. support_heldout scores "
                     "free generation; support_select scores the assistant's answers (the passage sentence its "
                     "answer ranker scores highest; the ranker weighs the model's likelihood with retrieval and "
                     "overlap features, fit on dev questions; 'no model' is the same ranker without the model). "
                     "Retrieval recall@k is the share of questions whose answering passage is among the top k."
                     if "rag" in recipe.stages else "")
                  + (" support_reply: held-out greetings and out-of-scope questions (the reference is the shop's "
                     "greeting or refusal). general_qa: general-knowledge questions asked with no system prompt "
                     "(contains: the answer appears in the reply), what fine-tuning must not destroy. citations: "
                     "the share of answers that cite a passage, and of those the share citing one that states the "
                     "reference answer; answers are scored without the citation marker." if any(
                         r[0].startswith(("support_reply", "general_qa", "citations")) for r in ev) else "")
                  + "</p>", table(list(EVAL_COLUMNS), ev)]
        rd = res.summary("reader")
        if rd:
            wrows = [(who, fmt((rd.get(who) or {}).get("dev_accuracy")),
                      ", ".join(f"{k} {v:+.2f}" for k, v in ((rd.get(who) or {}).get("weights") or {}).items()))
                     for who in WHOS if rd.get(who)]
            parts += [f"<h3>Answer ranker</h3><p>Fit on {fmt(rd.get('dev_questions'))} dev questions (held out of "
                      "training and of the table above); the answer is among the candidates for "
                      f"{fmt(rd.get('answer_in_candidates'))} of them.</p>",
                      table(["ranker", "dev accuracy", "weights"], wrows)]
        samples = _samples(run)
        if samples:
            heads = ["question", "reference", "base (generated)", "fine-tuned (generated)", "right"]
            if len(samples[0]) > 5:
                heads.append("assistant (fine-tuned, selected)")
            parts += ["<h3>Sample answers</h3>", table(heads, samples)]
    bundle = res.summary("bundle")
    if bundle:
        parts += ["<h2>Bundle</h2>", f"<p>{html.escape(str(bundle.get('bundle')))}: everything the assistant "
                  "needs, with the settings it was measured with.</p>",
                  table(["setting", "value"], [(k, fmt(v)) for k, v in (bundle.get("settings") or {}).items()])]
    return parts
