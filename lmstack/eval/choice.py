"""Log-likelihood choice tasks: MMLU / C-Eval multiple choice and intent-style classification.

Multiple choice follows Hendrycks et al. 2021 (MMLU) and lm-evaluation-harness: the prompt lists the
question and lettered options, ends in ``Answer:``, and the model's choice is the option whose continuation
(`` A``..`` D``, or the option text) has the highest log-likelihood. ``acc_norm`` divides each option's
log-likelihood by the option's length in characters (lm-eval's ``acc_norm``), which removes the bias toward
short options when whole option texts are scored. C-Eval (Huang et al. 2023) uses the same layout.
Classification scores each label's verbalizer after the prompt and reports accuracy and macro-F1.
"""

from __future__ import annotations

import random
import string

import numpy as np

from lmstack.errors import DataError
from lmstack.eval import metrics as M
from lmstack.eval.records import Record, read_records, render

LETTERS = string.ascii_uppercase


# ---------------------------------------------------------------------------------------------- MC items
def _mc_records(task, path: str):
    cols = None if task.csv_header else ["question"] + list(task.choice_fields) + ["answer"]
    recs = read_records(path, task.name, task.format, task.csv_header, cols)
    if not task.csv_header:
        for r in recs.items:  # positional MMLU CSV: rename to the configured field names
            r.data = {task.question_field: r.data["question"], **{k: r.data[k] for k in task.choice_fields},
                      task.answer_field: r.data["answer"]}
    return recs


def mc_item(task, rec: Record) -> tuple[str, list[str], int]:
    """(question, choices, gold index) of one record."""
    q = str(rec.get(task.name, task.question_field))
    field = task.choices_field
    if field is None and task.choice_fields[0] not in rec.data and isinstance(rec.data.get("choices"), list):
        field = "choices"  # the common JSONL layout, without having to say choices_field: choices
    if field:
        choices = rec.get(task.name, field)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"task {task.name}: {rec.file}:{rec.line}: field {field!r} must be a "
                            "list of at least 2 choices")
        choices = [str(c) for c in choices]
    else:
        choices = [str(rec.get(task.name, f)) for f in task.choice_fields]
    ans = rec.get(task.name, task.answer_field)
    gold = _gold_index(ans, choices)
    if gold is None:
        raise DataError(f"task {task.name}: {rec.file}:{rec.line}: answer {ans!r} is neither a letter "
                        f"A-{LETTERS[len(choices) - 1]}, a 0-based index, nor one of the choices")
    return q, choices, gold


def _gold_index(ans, choices: list[str]) -> int | None:
    if isinstance(ans, bool):
        return None
    if isinstance(ans, int):
        return ans if 0 <= ans < len(choices) else None
    s = str(ans).strip()
    if len(s) == 1 and s.upper() in LETTERS[:len(choices)]:
        return LETTERS.index(s.upper())
    if s.isdigit() and int(s) < len(choices):
        return int(s)
    return choices.index(s) if s in choices else None


def mc_prompt(task, rec: Record, q: str, choices: list[str]) -> str:
    """The question block ending in ``Answer:`` (no trailing space; the continuation starts with one)."""
    if task.prompt:
        return render(task.prompt, rec, task.name, choices=choices, letters=LETTERS[:len(choices)])
    if task.continuation == "text":
        return f"Question: {q}\nAnswer:"
    lines = [q.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def mc_continuations(task, choices: list[str]) -> list[str]:
    if task.continuation == "letter":
        return [f" {LETTERS[i]}" for i in range(len(choices))]
    return [f" {c}" for c in choices]


def _header(task) -> str:
    if task.prompt or task.continuation == "text" or not task.subject:
        return ""
    return f"The following are multiple choice questions (with answers) about {task.subject}.\n\n"


def mc_requests(task) -> tuple[list[dict], list[tuple[str, str]], object]:
    """Items and the (context, continuation) pairs to score, in item order."""
    recs = _mc_records(task, task.data)
    items_recs = recs.items[:task.limit] if task.limit else recs.items
    shots_pool = _mc_records(task, task.fewshot_data).items if task.fewshot_data else recs.items
    rng = random.Random(task.seed)
    items, pairs = [], []
    for rec in items_recs:
        q, choices, gold = mc_item(task, rec)
        shots = ""
        if task.num_fewshot:
            pool = [r for r in shots_pool if r is not rec]
            picked = pool[:task.num_fewshot] if task.fewshot_data else rng.sample(pool, min(task.num_fewshot, len(pool)))
            for s in picked:
                sq, sc, sg = mc_item(task, s)
                shots += mc_prompt(task, s, sq, sc) + mc_continuations(task, sc)[sg] + "\n\n"
        ctx = _header(task) + shots + mc_prompt(task, rec, q, choices)
        conts = mc_continuations(task, choices)
        items.append({"line": rec.line, "gold": gold, "n_choices": len(choices),
                      # acc_norm divides by the length of the option string (lm-eval: len(doc_to_choice))
                      "lens": [len(c) for c in (choices if task.continuation == "text" else LETTERS[:len(choices)])],
                      "first": len(pairs)})
        pairs += [(ctx, c) for c in conts]
    return items, pairs, recs


def evaluate_multiple_choice(lm, task, progress=None) -> dict:
    items, pairs, recs = mc_requests(task)
    lls = _score(lm, task, pairs, progress)
    preds, preds_norm, golds, samples = [], [], [], []
    for it in items:
        ll = np.array([lls[it["first"] + j] for j in range(it["n_choices"])])
        lens = np.array(it["lens"], dtype=float)
        p, pn = int(ll.argmax()), int((ll / np.maximum(lens, 1)).argmax())
        preds.append(p)
        preds_norm.append(pn)
        golds.append(it["gold"])
        samples.append({"line": it["line"], "gold": it["gold"], "pred": p, "pred_norm": pn,
                        "loglikelihoods": [round(float(x), 4) for x in ll]})
    return {
        "metrics": {"acc": M.accuracy(preds, golds), "acc_norm": M.accuracy(preds_norm, golds)},
        "n": len(items), "skipped": recs.skipped, "skipped_examples": recs.skipped_examples, "samples": samples,
    }


def _score(lm, task, pairs, progress) -> list[float]:
    reqs = [lm.encode_pair(c, x) for c, x in pairs]
    cb = None
    if progress is not None:
        bar = progress.add_task(task.name, total=len(reqs))
        cb = lambda k: progress.advance(bar, k)  # noqa: E731
    return [s for s, _ in lm.loglikelihood_tokens(reqs, cb)]


# ---------------------------------------------------------------------------------------------- classification
def evaluate_classification(lm, task, progress=None) -> dict:
    recs = read_records(task.data, task.name)
    items_recs = recs.items[:task.limit] if task.limit else recs.items
    labels = task.labels or sorted({str(r.get(task.name, task.label_field)) for r in recs.items})
    verbal = [task.verbalizers.get(lab, f" {lab}") for lab in labels]
    rng = random.Random(task.seed)
    pairs, golds = [], []
    for rec in items_recs:
        gold = str(rec.get(task.name, task.label_field))
        if gold not in labels:
            raise DataError(f"task {task.name}: {rec.file}:{rec.line}: label {gold!r} is not one of the task's "
                            f"labels ({', '.join(labels)})")
        shots = ""
        if task.num_fewshot:
            pool = [r for r in recs.items if r is not rec]
            for s in rng.sample(pool, min(task.num_fewshot, len(pool))):
                sl = str(s.get(task.name, task.label_field))
                shots += render(task.prompt, s, task.name) + task.verbalizers.get(sl, f" {sl}") + "\n\n"
        ctx = shots + render(task.prompt, rec, task.name)
        pairs += [(ctx, v) for v in verbal]
        golds.append(gold)
    lls = _score(lm, task, pairs, progress)
    k = len(labels)
    preds, samples = [], []
    for i, (rec, gold) in enumerate(zip(items_recs, golds)):
        ll = lls[i * k:(i + 1) * k]
        pred = labels[int(np.argmax(ll))]
        preds.append(pred)
        samples.append({"line": rec.line, "gold": gold, "pred": pred})
    return {
        "metrics": {"accuracy": M.accuracy(preds, golds), "macro_f1": M.macro_f1(preds, golds, labels)},
        "n": len(golds), "labels": labels, "skipped": recs.skipped, "skipped_examples": recs.skipped_examples,
        "samples": samples,
    }


def evaluate_with_classifier(clf, task, progress=None) -> dict:
    """A classification task on an encoder classifier (:class:`lmstack.model.classify.Classifier`): each record's
    ``text_field`` is classified directly (no prompt); accuracy and macro-F1 over the task's labels with the
    metrics of :mod:`lmstack.model.classify`. The classifier must know every label of the task."""
    from lmstack.model.classify import accuracy, macro_f1

    recs = read_records(task.data, task.name)
    items = recs.items[:task.limit] if task.limit else recs.items
    labels = task.labels or sorted({str(r.get(task.name, task.label_field)) for r in recs.items})
    known = set(clf.model.config.id2label.values())
    missing = [lab for lab in labels if lab not in known]
    if missing:
        raise DataError(f"task {task.name}: the classifier has no label {missing[0]!r} (its labels: "
                        f"{', '.join(sorted(known))})")
    texts, golds = [], []
    for rec in items:
        gold, text = str(rec.get(task.name, task.label_field)), rec.get(task.name, task.text_field)
        if gold not in labels:
            raise DataError(f"task {task.name}: {rec.file}:{rec.line}: label {gold!r} is not one of the task's "
                            f"labels ({', '.join(labels)})")
        if not isinstance(text, str):
            raise DataError(f"task {task.name}: {rec.file}:{rec.line}: field {task.text_field!r} is not a string")
        texts.append(text)
        golds.append(gold)
    preds = clf.predict(texts)
    samples = [{"line": rec.line, "gold": g, "pred": p["label"], "score": p["score"]}
               for rec, g, p in zip(items, golds, preds)]
    pl = [p["label"] for p in preds]
    return {"metrics": {"accuracy": accuracy(golds, pl), "macro_f1": macro_f1(golds, pl, labels)},
            "n": len(golds), "labels": labels, "skipped": recs.skipped, "skipped_examples": recs.skipped_examples,
            "samples": samples}
