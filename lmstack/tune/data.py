"""Fine-tuning data: instruction, chat and ShareGPT records -> messages; preference pairs; tokenization.

Accepted records (JSON Lines, or a JSON file holding a list), detected per record:

* instruction (Alpaca): ``{"instruction", "input"?, "output", "system"?}``
* chat (OpenAI): ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}``, with
  optional ``"tools"`` (OpenAI function definitions) and assistant ``"tool_calls"``: rendered exactly as
  ``lmstack serve`` renders them (:mod:`lmstack.tokenizer.tools`: the template's own tool format, else the generic
  tool prompt and ``<tool_call>`` blocks), so a model tuned on them calls tools the way the server parses them
* ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...], "system"?}``
* preference: ``{"prompt", "chosen", "rejected"}``; each a string or a list of messages (TRL's
  conversational form), or ``chosen`` / ``rejected`` as whole conversations sharing a prompt prefix.

A malformed record is counted and reported with its file and line (``DataReport``); a file with no usable
record raises :class:`DataError`. SFT examples are rendered with the tokenizer's chat template and trained on
assistant tokens only (``Tokenizer.render_chat`` loss mask).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from lmstack.errors import DataError
from lmstack.utils.io import iter_jsonl_lines

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "tool": "tool", "function_call": "assistant", "observation": "tool"}


class BadRecord(ValueError):
    """A record that cannot be used; the message says why."""


@dataclass
class DataReport:
    path: str
    records: int = 0
    used: int = 0
    truncated: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def add_bad(self, line: int, reason: str) -> None:
        self.bad.append((line, reason))

    def summary(self, show: int = 5) -> str:
        s = f"{self.path}: {self.used} of {self.records} records used"
        if self.truncated:
            s += f", {self.truncated} truncated to max_len"
        if self.bad:
            s += f", {len(self.bad)} skipped: " + "; ".join(f"line {ln}: {r}" for ln, r in self.bad[:show])
            if len(self.bad) > show:
                s += f"; ... ({len(self.bad) - show} more)"
        return s


# ---------------------------------------------------------------------------------------------- reading
def read_records(path: str | Path, report: DataReport) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each record; bad lines (not JSON, over the size cap) are counted in
    ``report`` (lmstack.utils.io.iter_jsonl_lines, the one reader of users' JSON Lines)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    if p.suffix == ".json":
        with open(p, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):  # one JSON array of records: parsed whole
            try:
                items = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
            for i, obj in enumerate(items, 1):
                report.records += 1
                yield i, obj  # for a JSON list, "line" is the 1-based record index
            return

    def bad(ln: int, why: str) -> None:
        report.records += 1
        report.add_bad(ln, why)

    for ln, obj in iter_jsonl_lines(p, bad):
        report.records += 1
        yield ln, obj


def _text(v: Any, what: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, dict) and x.get("type") == "text" for x in v):
        return "".join(str(x.get("text", "")) for x in v)
    raise BadRecord(f"{what} must be a string, got {type(v).__name__}")


def _check_messages(msgs: Any, what: str = "messages") -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord(f'"{what}" must be a non-empty list')
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRecord(f'{what}[{i}] must be an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise BadRecord(f'{what}[{i}].role is {m["role"]!r}; use one of {", ".join(ROLES)}')
        if m.get("content") is None and not m.get("tool_calls"):  # only a tool-calling turn may omit it
            raise BadRecord(f'{what}[{i}] ({m["role"]}) has no "content"')
        msg: dict[str, Any] = {"role": m["role"], "content": _text(m.get("content") or "", f"{what}[{i}].content")}
        if m.get("tool_calls"):
            if m["role"] != "assistant":
                raise BadRecord(f'{what}[{i}] has "tool_calls" but role {m["role"]!r}; only assistant turns call tools')
            msg["tool_calls"] = _check_calls(m["tool_calls"], f"{what}[{i}].tool_calls")
        out.append(msg)
    return out


def _check_calls(calls: Any, what: str) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` -> ``[{"type": "function", "function": {"name", "arguments": <object>}}]``."""
    if not isinstance(calls, list):
        raise BadRecord(f"{what} must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRecord(f'{what}[{j}] must be {{"function": {{"name": ..., "arguments": ...}}}}')
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise BadRecord(f"{what}[{j}].arguments is not valid JSON ({e.msg})") from None
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def record_tools(rec: Any) -> list[dict[str, Any]]:
    """A chat record's ``tools`` as OpenAI function tools (``{"type": "function", "function": {...}}``); a bare
    ``{"name", "parameters"}`` is wrapped. ``[]`` when the record has none."""
    tools = rec.get("tools") if isinstance(rec, dict) else None
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRecord('"tools" must be a list of function definitions')
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRecord(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        out.append({"type": "function", "function": fn})
    return out


def render_record(tok: Any, rec: Any):
    """An SFT record -> the tokenizer's ``ChatEncoding`` (ids, assistant loss mask). Records with ``tools`` or
    ``tool_calls`` go through the server's tool rendering first (the same prompt the served model will see)."""
    msgs = to_messages(rec)
    tools = record_tools(rec)
    if tools or any(m.get("tool_calls") for m in msgs):
        from lmstack.tokenizer.tools import render_messages, template_has_tools

        native = template_has_tools(getattr(tok, "chat_template", None))
        msgs, tpl_tools = render_messages(msgs, tools, native, "auto" if tools else "none")
        return tok.render_chat(msgs, tools=tpl_tools)
    return tok.render_chat(msgs)


def to_messages(rec: Any) -> list[dict[str, str]]:
    """One SFT record in any supported format -> OpenAI messages with at least one assistant turn."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = _check_messages(rec["messages"])
    elif "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not conv:
            raise BadRecord('"conversations" must be a non-empty list')
        msgs = [{"role": "system", "content": _text(rec["system"], "system")}] if rec.get("system") else []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise BadRecord(f'conversations[{i}] must have "from" and "value"')
            role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise BadRecord(f'conversations[{i}].from is {turn["from"]!r}; use system, human or gpt')
            msgs.append({"role": role, "content": _text(turn["value"], f"conversations[{i}].value")})
    elif "instruction" in rec or "output" in rec:
        if "instruction" not in rec or "output" not in rec:
            raise BadRecord('an instruction record needs "instruction" and "output"')
        user = _text(rec["instruction"], "instruction")
        extra = _text(rec.get("input") or "", "input")
        if extra.strip():
            user = f"{user}\n\n{extra}"
        msgs = [{"role": "system", "content": _text(rec["system"], "system")}] if rec.get("system") else []
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec["output"], "output")}]
    else:
        raise BadRecord('unknown format: expected "messages", "conversations" or "instruction"/"output" '
                        f"(got keys {', '.join(sorted(rec)) or 'none'})")
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in msgs):
        raise BadRecord("no assistant message with content or tool calls to train on")
    return msgs


def to_preference(rec: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """A preference record -> (prompt messages, chosen reply messages, rejected reply messages)."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise BadRecord(f'a preference record needs "chosen" and "rejected" (missing {", ".join(missing)})')

    def reply(v: Any, what: str) -> list[dict]:
        if isinstance(v, str):
            return [{"role": "assistant", "content": v}]
        return _check_messages(v, what)

    chosen, rejected = reply(rec["chosen"], "chosen"), reply(rec["rejected"], "rejected")
    p = rec.get("prompt")
    if p is None:  # whole conversations: the prompt is the shared prefix before the last assistant turn
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise BadRecord('no "prompt" and chosen/rejected share no prefix')
    else:
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _check_messages(p, "prompt")
    for name, r in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" and m["content"].strip() for m in r):
            raise BadRecord(f"{name} has no assistant reply with content")
    return prompt, chosen, rejected


# ---------------------------------------------------------------------------------------------- tokenizing
@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    ref_chosen: float | None = None  # reference log-probs, filled by precompute
    ref_rejected: float | None = None


def _truncate(ex: Example, max_len: int) -> tuple[Example, bool]:
    if len(ex.input_ids) <= max_len:
        return ex, False
    return Example(ex.input_ids[:max_len], ex.loss_mask[:max_len]), True


def load_sft(path: str | Path, tok: Any, max_len: int) -> tuple[list[Example], DataReport]:
    """Read, render and tokenize an SFT file. Raises DataError when no record is usable."""
    report = DataReport(str(path))
    out: list[Example] = []
    for ln, rec in read_records(path, report):
        try:
            enc = render_record(tok, rec)
        except BadRecord as e:
            report.add_bad(ln, str(e))
            continue
        except Exception as e:  # template errors (e.g. roles the template refuses) are per-record problems
            report.add_bad(ln, f"chat template failed: {e}")
            continue
        ex, cut = _truncate(Example(list(enc.input_ids), list(enc.loss_mask)), max_len)
        if sum(ex.loss_mask[1:]) == 0:
            report.add_bad(ln, f"no assistant token within the first {max_len} tokens (raise data.max_len)")
            continue
        report.truncated += cut
        out.append(ex)
    report.used = len(out)
    if not out:
        raise DataError(f"{report.summary()}; no usable record: expected instruction (instruction/output), "
                        'chat ("messages") or ShareGPT ("conversations") records')
    return out, report


def _reply_example(tok: Any, prompt: list[dict], reply: list[dict], max_len: int) -> tuple[Example, bool]:
    """Prompt + reply, loss on the reply's assistant tokens only (not on earlier turns of the prompt)."""
    full = tok.render_chat(prompt + reply)
    n_prompt = len(tok.render_chat(prompt, add_generation_prompt=True).input_ids)
    mask = [0 if i < n_prompt else m for i, m in enumerate(full.loss_mask)]
    return _truncate(Example(list(full.input_ids), mask), max_len)


def load_pairs(path: str | Path, tok: Any, max_len: int) -> tuple[list[PairExample], DataReport]:
    report = DataReport(str(path))
    out: list[PairExample] = []
    for ln, rec in read_records(path, report):
        try:
            prompt, chosen, rejected = to_preference(rec)
            c, cut_c = _reply_example(tok, prompt, chosen, max_len)
            r, cut_r = _reply_example(tok, prompt, rejected, max_len)
        except BadRecord as e:
            report.add_bad(ln, str(e))
            continue
        except Exception as e:
            report.add_bad(ln, f"chat template failed: {e}")
            continue
        if sum(c.loss_mask[1:]) == 0 or sum(r.loss_mask[1:]) == 0:
            report.add_bad(ln, f"chosen or rejected reply starts after max_len={max_len} tokens")
            continue
        report.truncated += cut_c or cut_r
        out.append(PairExample(c, r))
    report.used = len(out)
    if not out:
        raise DataError(f"{report.summary()}; no usable preference pair: expected "
                        '{"prompt", "chosen", "rejected"} records')
    return out, report


def split_val(items: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded random hold-out of ``val_fraction`` (at least one item when > 0 and there are >= 2 items)."""
    items = list(items)
    if val_fraction <= 0 or len(items) < 2:
        return items, []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [items[i] for i in train], [items[i] for i in val]
