"""Tool-calling evaluation: does the model call the right function with the right arguments, and only when it
should?

Each record is an OpenAI-format conversation with ``tools`` (``lmstack data tool-chats`` writes them); the last
assistant turn is the reference: its ``tool_calls`` (one or several) or, without calls, a prose answer. The prompt
is every message before it, rendered exactly as ``lmstack serve`` renders a ``tool_choice: "auto"`` request
(:mod:`lmstack.tokenizer.tools`), the model generates freely (greedy, no grammar: what the model decides is what is
measured), and ``<tool_call>`` blocks are parsed out of the text the way the server parses them.

Metrics (in the spirit of the Berkeley Function-Calling Leaderboard's AST checks, over all records unless said):

* ``decision_accuracy``  the model called a tool exactly when the reference does;
* ``name_accuracy``      records with reference calls: the multiset of called names equals the reference's;
* ``exact_match``        calls equal the reference as a multiset of (name, arguments) — arguments compared as
                         parsed JSON values, order of calls ignored; a no-call record matches when no call is made;
* ``args_valid``         predicted calls whose arguments validate against that tool's JSON schema (``jsonschema``),
                         over all predicted calls naming an offered tool;
* ``no_call_accuracy``   records without reference calls: no call was made.

A metric with no record to score (no predicted call for ``args_valid``) is left out of the results.
Per-kind and per-language exact match are in the result's ``breakdown`` (``kind`` / ``lang`` fields of a record).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from lmstack.errors import DataError
from lmstack.utils.io import iter_jsonl_lines

METRICS = ("decision_accuracy", "name_accuracy", "exact_match", "args_valid", "no_call_accuracy")


def _canon(args: Any) -> str:
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return "\x00" + args  # unparseable: equal only to the same text
    return json.dumps(args, sort_keys=True, ensure_ascii=False)


def _calls_of(msg: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], _canon(c["function"].get("arguments", {}))) for c in msg.get("tool_calls") or []]


def split_record(rec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, str]]]:
    """(prompt messages, tools, reference calls) of a record: the reference is its last assistant turn."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError('"messages" must be a non-empty list')
    last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant turn to use as the reference")
    tools = rec.get("tools") or []
    if not isinstance(tools, list) or not tools:
        raise ValueError('"tools" must be a non-empty list of function definitions')
    return msgs[:last], tools, _calls_of(msgs[last])


def score_calls(pred: list[tuple[str, str]], ref: list[tuple[str, str]]) -> dict[str, float | None]:
    """Scores of one record from canonical (name, arguments) pairs; ``None`` where a metric does not apply."""
    called, should = bool(pred), bool(ref)
    return {
        "decision_accuracy": float(called == should),
        "name_accuracy": float(Counter(n for n, _ in pred) == Counter(n for n, _ in ref)) if should else None,
        "exact_match": float(Counter(pred) == Counter(ref)),
        "no_call_accuracy": None if should else float(not called),
    }


def _validator(tools: list[dict[str, Any]]):
    import jsonschema

    schemas = {}
    for t in tools:
        fn = t.get("function", t)
        schemas[fn["name"]] = fn.get("parameters") or {"type": "object"}

    def valid(name: str, args: str) -> bool | None:
        if name not in schemas:
            return None
        try:
            jsonschema.validate(json.loads(args), schemas[name])
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        except jsonschema.SchemaError:
            return None
        return True

    return valid


def evaluate_tool_calls(lm, task, progress=None) -> dict:
    from lmstack.tokenizer.tools import parse_tool_calls, render_messages, template_has_tools

    items, skipped_examples = [], []

    def bad(ln: int, why: str) -> None:
        skipped_examples.append(f"{task.data}:{ln}: {why}")

    for ln, rec in iter_jsonl_lines(task.data, bad):
        try:
            prompt_msgs, tools, ref = split_record(rec)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            bad(ln, str(e))
            continue
        items.append((ln, rec, prompt_msgs, tools, ref))
        if task.limit and len(items) >= task.limit:
            break
    if not items:
        raise DataError(f"task {task.name}: {task.data} has no usable record (expected chat records with "
                        '"messages" ending in an assistant turn and "tools"; `lmstack data tool-chats` writes them)')
    native = template_has_tools(getattr(lm.tok, "chat_template", None))
    prompts = []
    for _, _, msgs, tools, _ in items:
        rendered, tpl_tools = render_messages(msgs, tools, native, "auto")
        prompts.append(lm.tok.apply_chat_template(rendered, add_generation_prompt=True, tools=tpl_tools))
    cb = None
    if progress is not None:
        bar = progress.add_task(f"{task.name} (generate)", total=len(prompts))
        cb = lambda k: progress.advance(bar, k)  # noqa: E731
    outs = lm.generate(prompts, max_tokens=task.max_tokens, stop=[], temperature=0.0, seed=task.seed, progress_cb=cb)
    totals: dict[str, list[float]] = {m: [] for m in METRICS}
    breakdown: dict[str, list[float]] = {}
    samples = []
    for (ln, rec, _, tools, ref), out in zip(items, outs):
        text = out[0]
        names = {t.get("function", t)["name"] for t in tools}
        _, calls, _ = parse_tool_calls(text, names, final=True)
        pred = _calls_of({"tool_calls": calls})
        s = score_calls(pred, ref)
        for k, v in s.items():
            if v is not None:
                totals[k].append(v)
        valid = _validator(tools)
        for name, args in pred:
            ok = valid(name, args)
            if ok is not None:
                totals["args_valid"].append(float(ok))
        for key in (f"kind={rec.get('kind')}", f"lang={rec.get('lang')}"):
            if not key.endswith("=None"):
                breakdown.setdefault(key, []).append(s["exact_match"])
        samples.append({"line": ln, "kind": rec.get("kind"), "prediction": text,
                        "calls": [{"name": n, "arguments": a} for n, a in pred],
                        "reference": [{"name": n, "arguments": a} for n, a in ref], **s})
    metrics = {k: sum(v) / len(v) for k, v in totals.items() if v}  # a metric with nothing to score is left out
    return {"metrics": metrics, "n": len(items), "skipped": len(skipped_examples), "skipped_examples": skipped_examples[:5],
            "breakdown": {k: {"exact_match": sum(v) / len(v), "n": len(v)} for k, v in sorted(breakdown.items())},
            "samples": samples}
