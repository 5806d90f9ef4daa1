"""Hooks a server calls around one OpenAI-style chat request (no web framework needed here).

    guard = Guard.from_policy(path)                             # `--guard policy.yaml`
    req, v = guard_chat_request(guard, req, key=api_key)       # before the model: the last user turn
    if v.blocked: answer with v.message (finish_reason "content_filter") and stop
    ctx = guard_passages(guard, passage_texts, key=api_key)    # retrieved passages / tool outputs -> ctx.passages
    v = guard_chat_response(guard, answer, ctx.passages, key)  # a whole answer: send v.text (or v.message)
    for text, v in guard_stream(guard, deltas, ctx.passages, key): send text; if v and v.blocked: stop

The request's user turns have their PII redacted in place (the model never sees it); an earlier turn is not
re-checked for injection (it was checked when it was the last turn) but is redacted as well.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

from lmstack.guard.guard import ContextResult, Guard, GuardContext, Verdict
from lmstack.text import content_text

CONTENT_FILTER = "content_filter"  # the OpenAI finish_reason for an answer a filter stopped


def guard_chat_request(guard: Guard, req: dict[str, Any], key: str | None = None,
                       request_id: str | None = None, record: Any = None) -> tuple[dict[str, Any], Verdict]:
    """(request with redacted user turns, verdict of the last user turn). A request without a user turn passes."""
    msgs = req.get("messages")
    if not isinstance(msgs, list):
        return req, Verdict("allow", "")
    users = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return req, Verdict("allow", "")
    out = [dict(m) if isinstance(m, dict) else m for m in msgs]
    from lmstack.guard.guard import CURRENT_PLACEHOLDERS, CURRENT_RECORD

    ctx = GuardContext(key=key, request_id=request_id, record=record, placeholders=CURRENT_PLACEHOLDERS.get())

    rec = record or CURRENT_RECORD.get()
    if rec is not None and rec.model is None and isinstance(req.get("model"), str):
        rec.model = req["model"][:200]
    last = users[-1]
    v = guard.check_input(content_text(out[last].get("content")), ctx)
    if not v.blocked:
        tools = [i for i, m in enumerate(out) if isinstance(m, dict) and m.get("role") == "tool"
                 and isinstance(m.get("content"), str) and m["content"]]
        if tools:  # tool outputs are passages: instructions inside them are cut (indirect injection)
            clean = guard.check_context([out[i]["content"] for i in tools], ctx).passages
            for i, t in zip(tools, clean):
                out[i]["content"] = t
        out[last]["content"] = v.text
        pii = guard.policy.input.pii
        if pii and pii.enabled and pii.action == "redact":
            from lmstack.text.pii import pseudonymize, redact

            back = set(pii.reversible) if ctx.placeholders is not None else set()
            for i in users[:-1]:
                t = content_text(out[i].get("content"))
                if t:
                    if back:  # the same value gets the same placeholder in every turn
                        t, _ = pseudonymize(t, sorted(back), ctx.placeholders)
                    out[i]["content"] = redact(t, pii.kinds).text
    return {**req, "messages": out}, v


def guard_passages(guard: Guard, passages: Sequence[str], key: str | None = None, record: Any = None) -> ContextResult:
    return guard.check_context(passages, GuardContext(key=key, record=record))


def guard_chat_response(guard: Guard, answer: str, passages: Sequence[str] = (), key: str | None = None,
                        request_id: str | None = None, record: Any = None) -> Verdict:
    return guard.check_output(answer, GuardContext(key=key, passages=passages, request_id=request_id, record=record))


def guard_stream(guard: Guard, deltas: Iterable[str], passages: Sequence[str] = (), key: str | None = None,
                 request_id: str | None = None) -> Iterator[tuple[str, Verdict | None]]:
    """(safe text, None) per delta while the stream is clean; on a block, one final ("", verdict) and the
    stream ends (the caller stops generation and finishes with ``finish_reason`` "content_filter"); at the end,
    ("rest", verdict of the whole answer)."""
    s = guard.stream(GuardContext(key=key, passages=passages, request_id=request_id))
    for d in deltas:
        out = s.feed(d)
        if s.stopped:
            yield "", s.verdict
            return
        if out:
            yield out, None
    rest = s.close()
    yield rest, s.verdict


def tool_passages(req: dict[str, Any]) -> list[str]:
    """The request's tool-turn contents: the passages a plain server (``lmstack serve --guard``) grounds the
    answer in (a client doing its own retrieval sends them as tool results)."""
    msgs = req.get("messages") if isinstance(req, dict) else None
    return [t for m in msgs or [] if isinstance(m, dict) and m.get("role") == "tool"
            for t in [content_text(m.get("content"))] if t]
