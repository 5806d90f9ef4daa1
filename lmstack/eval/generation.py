"""Generation tasks: render a prompt per record (optionally in the chat template), generate, and score the
text against references with exact match, token F1 (SQuAD), BLEU / chrF (sacrebleu) and ROUGE (rouge-score).
"""

from __future__ import annotations

import random

from lmstack.errors import DataError
from lmstack.eval import metrics as M
from lmstack.eval.records import Record, read_records, render


def _refs(task, rec: Record) -> list[str]:
    r = rec.get(task.name, task.reference_field)
    refs = [r] if isinstance(r, (str, int, float)) else r
    if not isinstance(refs, list) or not refs:
        raise DataError(f"task {task.name}: {rec.file}:{rec.line}: field {task.reference_field!r} must be a string "
                        "or a non-empty list of strings")
    return [str(x) for x in refs]


def build_prompt(lm, task, rec: Record, shots: list[Record]) -> str:
    text = ""
    for s in shots:
        text += render(task.prompt, s, task.name) + " " + _refs(task, s)[0] + "\n\n"
    text += render(task.prompt, rec, task.name)
    if task.chat:
        msgs = ([{"role": "system", "content": task.system}] if task.system else []) + [
            {"role": "user", "content": text}]
        return lm.tok.apply_chat_template(msgs, add_generation_prompt=True)
    return text


def evaluate_generation(lm, task, progress=None) -> dict:
    recs = read_records(task.data, task.name)
    items = recs.items[:task.limit] if task.limit else recs.items
    rng = random.Random(task.seed)
    prompts, refs = [], []
    for rec in items:
        pool = [r for r in recs.items if r is not rec]
        shots = rng.sample(pool, min(task.num_fewshot, len(pool))) if task.num_fewshot else []
        prompts.append(build_prompt(lm, task, rec, shots))
        refs.append(_refs(task, rec))
    cb = None
    if progress is not None:
        bar = progress.add_task(f"{task.name} (generate)", total=len(prompts))
        cb = lambda k: progress.advance(bar, k)  # noqa: E731
    kw = {"copy": [_copy_from(task, rec) for rec in items]} if task.copy_field else {}
    outs = lm.generate(prompts, max_tokens=task.max_tokens, stop=task.stop, temperature=0.0, seed=task.seed,
                       progress_cb=cb, **kw)
    raw = [o[0] for o in outs]
    preds = [apply_filters(y, task.remove, task.strip) for y in raw]
    samples = [{"line": r.line, "prompt": p[-500:], "prediction": y, "references": rf}
               for r, p, y, rf in zip(items, prompts, preds, refs)]
    if task.remove:  # what the model wrote, before the filters
        for s, y in zip(samples, raw):
            s["raw"] = y
    return {"metrics": score_generation(preds, refs, task.metrics, task.bleu_tokenize), "n": len(preds),
            "skipped": recs.skipped, "skipped_examples": recs.skipped_examples, "samples": samples}


def _copy_from(task, rec: Record):
    """The record's texts to quote (``task.copy_field``: a string, a list of strings, or ``{"texts": [...],
    "weights": [...]}`` with one extra bonus per text, e.g. a ranker's log-probabilities) with the task's bonuses:
    the engine's ``CopyFrom`` fields (``lmstack.serve.types``), as a plain mapping (eval sits below serve)."""
    texts = rec.get(task.name, task.copy_field)
    weights = None
    if isinstance(texts, dict):
        texts, weights = texts.get("texts"), texts.get("weights")
    texts = [texts] if isinstance(texts, str) else texts
    where = f"task {task.name}: {rec.file}:{rec.line}: field {task.copy_field!r}"
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where} must be a string, a list of strings (the texts the answer may quote) or "
                        '{"texts": [...], "weights": [...]}')
    if weights is not None and (not isinstance(weights, list) or len(weights) != len(texts) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and -100 <= w <= 100 for w in weights)):
        raise DataError(f"{where}: weights must be one number in [-100, 100] per text")
    return {"texts": tuple(texts), "bias": task.copy_bias, "start_bias": task.copy_start_bias,
            "weights": None if weights is None else tuple(float(w) for w in weights)}


def apply_filters(text: str, remove: list[str], strip: bool = True) -> str:
    """The prediction scored: every match of the ``remove`` regexes deleted (citation markers such as ``[2]``,
    like lm-evaluation-harness's regex filters), then stripped."""
    import re

    for pat in remove:
        text = re.sub(pat, "", text)
    return text.strip() if strip else text


def score_generation(preds: list[str], refs: list[list[str]], metrics: list[str],
                     bleu_tokenize: str = "auto") -> dict[str, float]:
    out: dict[str, float] = {}
    n = max(len(preds), 1)
    if "exact_match" in metrics:
        out["exact_match"] = sum(M.exact_match(p, r) for p, r in zip(preds, refs)) / n
    if "f1" in metrics:
        out["f1"] = sum(M.token_f1(p, r) for p, r in zip(preds, refs)) / n
    if "contains" in metrics:
        out["contains"] = sum(M.contains(p, r) for p, r in zip(preds, refs)) / n
    if "bleu" in metrics:
        out["bleu"] = M.bleu(preds, refs, tokenize=bleu_tokenize)
    if "chrf" in metrics:
        out["chrf"] = M.chrf(preds, refs)
    rtypes = [t for t in ("rouge1", "rouge2", "rougeL") if t in metrics]
    if rtypes:
        out.update(M.rouge(preds, refs, rtypes))
    return out
