"""What a person reads at the end of ``lmstack run``: a summary table, ``report.html``, the next commands.

``report.html`` is one self-contained page (no network): the stage table, the data report's numbers, the
loss curves (PNG embedded as base64), and the evaluation tables with the base model beside the fine-tuned
one, plus a few held-out answers side by side.
"""

from __future__ import annotations

import base64
import html
import os
import shlex
import json
from pathlib import Path
from typing import Any

from lmstack.pipeline.runner import PipelineResult
from lmstack.utils.io import atomic_write_text

HEADLINE = {"support_heldout": ("rougeL", "exact_match", "f1", "chrf"),
            "support_select": ("rougeL", "exact_match", "f1", "chrf"),
            "heldout_text_ppl": ("perplexity", "bits_per_byte")}


def _fmt(v: Any) -> str:
    if v is None or v == {}:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def stage_rows(res: PipelineResult) -> list[tuple[str, str, str, str]]:
    """(stage, status, time, key figures) per stage."""
    rows = []
    for s in res.stages:
        m = s.summary
        if s.name == "data":
            fig = (f"general {_fmt(m.get('general_documents_kept'))}/{_fmt(m.get('general_documents_in'))} docs kept "
                   f"({_fmt(m.get('general_chars_kept'))} chars); {_fmt(m.get('shop_pages'))} shop pages; "
                   f"{_fmt(m.get('sft_examples'))} chats; {_fmt(m.get('heldout_questions'))} held-out questions")
        elif s.name == "rag":
            ret, k = m.get("retrieval") or {}, m.get("k")
            fig = (f"{_fmt(m.get('chunks'))} chunks indexed; {_fmt(m.get('sft_examples'))} grounded chats; held-out "
                   f"recall@1 {_fmt(ret.get('recall@1'))}, recall@{k} {_fmt(ret.get(f'recall@{k}'))}")
        elif s.name == "tokenizer":
            fig = (f"vocab {_fmt(m.get('vocab_size'))}; {_fmt(m.get('train_tokens'))} train / "
                   f"{_fmt(m.get('val_tokens'))} val tokens; {_fmt(m.get('chars_per_token'))} chars/token")
        elif s.name == "pretrain":
            fig = (f"{_fmt(m.get('parameters'))} params; {_fmt(m.get('steps'))} steps; loss {_fmt(m.get('last_loss'))}; "
                   f"val loss {_fmt(m.get('val_loss'))} (ppl {_fmt(m.get('val_ppl'))})")
        elif s.name == "finetune":
            fig = (f"{m.get('method')}; {_fmt(m.get('steps'))} steps; loss {_fmt(m.get('last_loss'))}; "
                   f"val loss {_fmt(m.get('val_loss'))}")
        elif s.name == "reader":
            fig = f"answer ranker fit on {_fmt(m.get('dev_questions'))} dev questions; dev accuracy " + ", ".join(
                f"{who} {_fmt((m.get(who) or {}).get('dev_accuracy'))}" for who in ("no_model", "base", "finetuned")
                if m.get(who))
        elif s.name == "eval":
            parts = []
            for who in ("no_model", "base", "finetuned"):
                for task in ("support_select", "support_heldout"):
                    qa = (m.get(who) or {}).get(task, {})
                    if qa:
                        parts.append(f"{who} {task.split('_')[1]}: ROUGE-L {_fmt(qa.get('rougeL'))} "
                                     f"F1 {_fmt(qa.get('f1'))} EM {_fmt(qa.get('exact_match'))}")
            fig = "; ".join(parts)
        else:
            fig = ", ".join(f"{k}={_fmt(v)}" for k, v in m.items() if not isinstance(v, (dict, list)))
        rows.append((s.name, s.status, _secs(s.seconds) if s.status != "skipped" else "-", fig))
    return rows


EVAL_COLUMNS = ("task", "metric", "no model", "base", "fine-tuned")


def eval_rows(res: PipelineResult) -> list[tuple[str, str, str, str, str]]:
    """(task, metric, no model, base, fine-tuned) for the headline metrics; "no model" is the assistant's
    answer ranker without the model's likelihood (retrieval, overlap, embeddings), when the run has one."""
    m = res.summary("eval")
    whos = ("no_model", "base", "finetuned")
    by = {w: m.get(w) or {} for w in whos}
    rows = []
    for task in sorted(set().union(*by.values())):
        keys = HEADLINE.get(task) or sorted(set().union(*(by[w].get(task, {}) for w in whos)))
        for k in keys:
            vals = [by[w].get(task, {}).get(k) for w in whos]
            if any(v is not None for v in vals):
                rows.append((task, k, *map(_fmt, vals)))
    lang_by = {w: m.get(f"{w}_by_lang") or {} for w in whos}
    for task, prefix in (("support_select", "select_"), ("support_heldout", "")):
        for lang in sorted(set().union(*lang_by.values())):
            for k in HEADLINE["support_heldout"]:
                vals = [lang_by[w].get(lang, {}).get(prefix + k) for w in whos]
                if any(v is not None for v in vals):
                    rows.append((f"{task} ({lang})", k, *map(_fmt, vals)))
    ret = m.get("retrieval") or {}
    label = "retrieval (BM25 + dense)" if res.summary("rag").get("dense") else "retrieval (BM25)"
    for k, v in ret.items():  # the same passages for every column: one number
        if not k.startswith(("en_", "zh_")) or k.endswith(("@1", "@3")):
            rows.append((label, k, _fmt(v), _fmt(v), _fmt(v)))
    return rows


def print_summary(res: PipelineResult, console) -> None:
    from rich.table import Table

    t = Table(title=f"lmstack run {res.recipe.name}: {_secs(res.seconds)}", show_lines=False)
    for c in ("stage", "status", "time", "result"):
        t.add_column(c, overflow="fold")
    for row in stage_rows(res):
        t.add_row(*row)
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
    recipe, run = res.recipe, res.run_dir
    ft = res.summary("finetune").get("final_dir") or (str(run / "finetune" / "final") if "finetune" in recipe.stages else None)
    base = str(Path(recipe.model)) if recipe.model else str(run / "pretrain" / "final")
    if ft and (Path(ft) / "adapter_config.json").is_file():
        target = f"--model {base} --adapter {ft}"
    elif ft:
        target = f"--model {ft}"
    else:
        target = f"--model {base}"
    system = recipe.data.shop.system_prompt
    if "rag" in recipe.stages:  # the model was tuned on retrieved passages: talk to it the same way
        index = run / "rag" / "index.sqlite"
        sys_opt = f" --system {shlex.quote(system)}" if system else ""
        k = f" --k {recipe.rag.k}" if recipe.rag.k != 3 else ""
        if "reader" in recipe.stages:
            k += f" --ranker {run / 'reader' / 'ranker.json'}"
        return [f"lmstack support chat {target} --index {index}{k}{sys_opt} --show-context",
                f"lmstack support serve {target} --index {index}{k}{sys_opt} --port 8000   "
                f"# OpenAI API; web chat at http://127.0.0.1:8000"]
    if system is None:
        from lmstack.apps.support.dialogues import SYSTEM_PROMPT as system
    return [f"lmstack chat {target} --system {shlex.quote(system)} --temperature 0",
            f"lmstack serve {target} --port 8000   # OpenAI API; web chat at http://127.0.0.1:8000"]


# ------------------------------------------------------------------------------------------------- HTML
def _table(headers: list[str], rows: list[tuple | list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _img(path: str | None, alt: str) -> str:
    if not path or not Path(path).is_file():
        return f"<p class='dim'>({html.escape(alt)}: no plot)</p>"
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


def _samples(run: Path, n: int = 10) -> list[tuple[str, ...]]:
    """Side by side: question, reference, base answer, fine-tuned answer, and the assistant's selected answer
    when the run has one (n held-out questions spread over the set)."""
    def load(who: str, task: str = "support_heldout") -> list[dict[str, Any]]:
        p = run / "eval" / who / "samples" / f"{task}.jsonl"
        if not p.is_file():
            return []
        return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]

    qa = run / "eval" / "support_heldout.jsonl"
    qs = [json.loads(x) for x in qa.read_text(encoding="utf-8").splitlines() if x.strip()] if qa.is_file() else []
    base, ft, sel = load("base"), load("finetuned"), load("finetuned", "support_select")
    rows = []
    if len(qs) > n:  # spread over the set (it is sorted by id: FAQ first, then products; EN and ZH)
        step = len(qs) / n
        picks = [int(i * step) for i in range(n)]
    else:
        picks = list(range(len(qs)))
    for i in picks:
        q = qs[i]
        row = (q["question"], q["answer"], base[i]["prediction"] if i < len(base) else "-",
               ft[i]["prediction"] if i < len(ft) else "-")
        rows.append(row + ((sel[i]["prediction"] if i < len(sel) else "-",) if sel else ()))
    return rows


CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}.dim{color:#888}
code{background:#f4f4f4;padding:1px 4px}h2{border-bottom:1px solid #eee;padding-bottom:.2em;margin-top:1.5em}"""


def write_html(res: PipelineResult) -> Path:
    run, recipe = res.run_dir, res.recipe
    parts = [f"<h1>lmstack run: {html.escape(recipe.name)}</h1>",
             f"<p>{html.escape(recipe.description)}</p>" if recipe.description else "",
             f"<p class='dim'>recipe {html.escape(str(recipe.source))}; run directory {html.escape(str(run))}; "
             f"total {_secs(res.seconds)}</p>",
             "<h2>Stages</h2>", _table(["stage", "status", "time", "result"], stage_rows(res))]
    data = res.summary("data")
    if data:
        rows = [(k, _fmt(v)) for k, v in data.items() if not isinstance(v, (dict, list)) and k != "data_report"]
        parts += ["<h2>Data</h2>", _table(["figure", "value"], rows)]
        steps = data.get("steps") or []
        if steps:
            keys = sorted({k for s in steps for k in s}, key=lambda k: (k != "name", k != "step", k))
            parts.append(_table(keys, [[_fmt(s.get(k)) for k in keys] for s in steps]))
        if data.get("data_report"):
            rel = os.path.relpath(data["data_report"], run)
            parts.append(f"<p>Full data report: <a href='{html.escape(rel)}'>{html.escape(rel)}</a></p>")
    for name, title in (("pretrain", "Pretraining"), ("finetune", "Fine-tuning")):
        m = res.summary(name)
        if m:
            rows = [(k, _fmt(v)) for k, v in m.items() if not isinstance(v, (dict, list)) and k not in ("loss_png",)]
            parts += [f"<h2>{title}</h2>", _table(["figure", "value"], rows), _img(m.get("loss_png"), f"{name} loss")]
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
                     if "rag" in recipe.stages else "") + "</p>", _table(list(EVAL_COLUMNS), ev)]
        rd = res.summary("reader")
        if rd:
            wrows = [(who, _fmt((rd.get(who) or {}).get("dev_accuracy")),
                      ", ".join(f"{k} {v:+.2f}" for k, v in ((rd.get(who) or {}).get("weights") or {}).items()))
                     for who in ("no_model", "base", "finetuned") if rd.get(who)]
            parts += [f"<h3>Answer ranker</h3><p>Fit on {_fmt(rd.get('dev_questions'))} dev questions (held out of "
                      "training and of the table above); the answer is among the candidates for "
                      f"{_fmt(rd.get('answer_in_candidates'))} of them.</p>",
                      _table(["ranker", "dev accuracy", "weights"], wrows)]
        samples = _samples(run)
        if samples:
            heads = ["question", "reference", "base (generated)", "fine-tuned (generated)"]
            if len(samples[0]) > 4:
                heads.append("assistant (fine-tuned, selected)")
            parts += ["<h3>Sample answers</h3>", _table(heads, samples)]
    parts += ["<h2>Next</h2>", "<pre>" + html.escape("\n".join(next_commands(res))) + "</pre>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>lmstack run {html.escape(recipe.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = run / "report.html"
    atomic_write_text(out, page)
    return out
