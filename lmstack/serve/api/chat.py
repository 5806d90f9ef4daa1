"""``POST /v1/chat/completions``: the chat template, then one engine request with ``n`` completions.

Response and chunk shapes follow the OpenAI API reference (``chat.completion`` and
``chat.completion.chunk``): the first chunk of each choice carries ``delta.role``, content chunks carry
``delta.content``, the last chunk of each choice carries ``finish_reason``; with
``stream_options.include_usage`` every chunk has ``usage: null`` and one final chunk with no choices
carries the usage; the stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from lmstack.serve.api import protocol as P
from lmstack.serve.api import tools as T
from lmstack.serve.api.common import (
    SSE_DONE, ServedModel, cache_salt, chat_logprobs, check_context, check_prompt_bytes, check_structured,
    constraint_fields, finish_reason, first_then_rest, sse,
    tracked_generate, usage,
)
from lmstack.serve.api.errors import APIError, from_exception
from lmstack.serve.types import RequestOutput


def _prompt_ids(model: ServedModel, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The chat template's token ids (run in a worker thread: a long conversation takes a while). Every message
    is the client's text: control tokens typed inside it (``<|im_end|>``) are encoded as plain text, so no
    message can close its turn or open a system turn (``model.sanitize_kw``, on by default)."""
    kw = dict(model.sanitize_kw)
    if tools:
        kw["tools"] = tools
    try:
        ids = model.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, **kw)
    except Exception as e:  # a template that rejects the conversation (e.g. roles must alternate)
        raise APIError(400, f"The chat template rejected these messages: {e}", param="messages") from e
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@dataclass
class ToolPlan:
    """What a request's tools mean for this response: the tools, the choice, and whether to parse calls."""

    tools: list[dict[str, Any]]
    choice: str | None  # "none" | "auto" | "required" | a function name
    parallel: bool

    @property
    def parse(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


async def create_chat_completion(model: ServedModel, req: P.ChatCompletionRequest):
    P.check_unsupported(req)
    P.check_ranges(req, model.vocab_size)
    msgs, size = P.chat_messages(req)
    tools = T.check_tools(req.tools)
    plan = ToolPlan(tools, T.check_tool_choice(req.tool_choice, tools), req.parallel_tool_calls)
    structured, sparam = P.structured_output(req)
    if plan.parse and plan.choice not in ("auto",) and structured is not None:
        raise APIError(400, f"tool_choice {plan.choice!r} and {sparam} both constrain the output; send one.",
                       param="tool_choice")
    if plan.parse and (plan.choice != "auto" or structured is None):  # auto: lazy, only once a call is opened
        structured, sparam = T.tool_grammar(tools, plan.choice or "required", plan.parallel), "tools"
    check_prompt_bytes(model, size + len(json.dumps(tools).encode()) if tools else size, "messages")
    native = T.template_has_tools(getattr(model.tokenizer, "chat_template", None))
    msgs, tpl_tools = T.render_messages(msgs, tools, native, plan.choice)
    # template + tokenizer off the event loop: other requests (and /health) are answered meanwhile
    prompt_ids = await asyncio.to_thread(_prompt_ids, model, msgs, req.add_generation_prompt, tpl_tools)
    k = P.chat_logprobs_k(req)
    want = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if want is not None and want < 1:
        raise APIError(400, "max_tokens must be >= 1.", param="max_tokens")
    max_tokens = check_context(model, len(prompt_ids), want, "messages")
    params = P.sampling_params(req, max_tokens=max_tokens, logprobs=k, logprobs_param="top_logprobs",
                               vocab_size=model.vocab_size,
                               cache_salt=cache_salt(req.cache_salt), structured=structured,
                               watermark=model.watermark)
    await asyncio.to_thread(check_structured, model, params, sparam)
    head = chat_head(model.name)
    first, rest = await first_then_rest(tracked_generate(model, prompt_ids, params, head["id"]), "messages")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(model, head, first, rest, req.n, k, include_usage, plan),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    final = first
    try:
        if not final.finished:
            async for out in rest:
                final = out
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  (cancelled by a disconnect: abort the request)
    return JSONResponse(_full(model, head, final, k, plan))


# ------------------------------------------------------------------------------ response shapes
# The one builder of chat.completion bodies and chunks: the routes below and the support app's answers
# (lmstack/apps/support/server.py) both use these.
def chat_head(model_name: str | None) -> dict[str, Any]:
    """The fields every body and chunk of one response shares (a fresh ``chatcmpl-`` id)."""
    return dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name,
                system_fingerprint=None)


def chat_choice(index: int, content: str | None, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None, tool_calls: list[dict[str, Any]] | None = None,
                **extra: Any) -> dict[str, Any]:
    """One choice of a ``chat.completion`` body (``extra``: lmstack's fields, e.g. ``constraint_satisfied``)."""
    return {"index": index,
            "message": {"role": "assistant", "content": content, "refusal": None, "tool_calls": tool_calls or None},
            "logprobs": logprobs, "finish_reason": finish_reason, **extra}


def chat_completion(head: dict[str, Any], choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
    """A whole ``chat.completion`` body (``use``: :func:`~lmstack.serve.api.common.usage`)."""
    return {**head, "object": "chat.completion", "choices": choices, "usage": use}


def chat_chunk(head: dict[str, Any], index: int, delta: dict[str, Any], logprobs: Any = None,
               finish_reason: str | None = None, include_usage: bool = False, **choice_extra: Any) -> str:
    """One ``chat.completion.chunk`` event for choice ``index`` (with ``usage: null`` when the stream will end
    with a usage chunk)."""
    extra = {"usage": None} if include_usage else {}
    return sse({**head, "object": "chat.completion.chunk", "choices": [
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **choice_extra}],
        **extra})


def chat_usage_chunk(head: dict[str, Any], use: dict[str, Any]) -> str:
    """The last event before ``[DONE]`` with ``stream_options.include_usage``: no choices, the usage."""
    return sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": use})


def tool_finish(reason: str | None, calls: list[dict[str, Any]]) -> str | None:
    """OpenAI's ``tool_calls`` finish when the model stopped after calling; ``length`` stays ``length``."""
    return "tool_calls" if calls and reason == "stop" else finish_reason(reason)


def _full(model: ServedModel, head: dict[str, Any], out: RequestOutput, k: int | None,
          plan: ToolPlan | None = None) -> dict[str, Any]:
    choices = []
    for o in out.outputs:
        content: str | None = o.text
        calls: list[dict[str, Any]] = []
        if plan is not None and plan.parse:
            content, calls, _ = T.parse_tool_calls(o.text, plan.names)
            if calls and not plan.parallel:
                calls = calls[:1]
            content = content if content.strip() or not calls else None
        choices.append(chat_choice(o.index, content, tool_finish(o.finish_reason, calls),
                                   chat_logprobs(model, o.logprobs, k or 0) if k is not None else None,
                                   calls, **constraint_fields(o)))
    n_gen = sum(len(o.token_ids) for o in out.outputs)
    return chat_completion(head, choices,
                           usage(len(out.prompt_token_ids), n_gen, out.metrics.num_cached_prompt_tokens))


async def _stream(model: ServedModel, head: dict[str, Any], first: RequestOutput,
                  rest: AsyncIterator[RequestOutput], n: int, k: int | None,
                  include_usage: bool, plan: ToolPlan | None = None) -> AsyncIterator[str]:
    sent = [0] * n  # tokens already streamed per choice (for slicing cumulative logprobs)
    started = [False] * n
    done = [False] * n
    tools = [T.ToolStream(plan.names) for _ in range(n)] if plan is not None and plan.parse else None

    def chunk(index: int, delta: dict[str, Any], lp: Any = None, reason: str | None = None, **extra: Any) -> str:
        return chat_chunk(head, index, delta, lp, reason, include_usage, **extra)

    last = first
    try:
        out = first
        while True:
            last = out
            for o in out.outputs:
                i = o.index
                if done[i]:
                    continue
                if not started[i]:
                    started[i] = True
                    yield chunk(i, {"role": "assistant", "content": ""})
                new = len(o.token_ids) - sent[i]
                lp = None
                if k is not None and o.logprobs is not None and new > 0:
                    lp = chat_logprobs(model, o.logprobs[sent[i]:sent[i] + new], k)
                sent[i] = len(o.token_ids)
                if tools is not None:  # content up to a <tool_call>, then one delta pair per complete call
                    ts = tools[i]
                    text, calls = ts.step(o.text, o.finish_reason is not None)
                    if text or lp is not None:
                        yield chunk(i, {"content": text}, lp)
                    if calls:
                        if not plan.parallel:  # type: ignore[union-attr]
                            calls = [c for c in calls if c["index"] == 0]
                        for c in calls:  # the call's id and name, then its arguments: one chunk each
                            yield chunk(i, {"tool_calls": [c]})
                elif o.delta_text or lp is not None:  # no empty chunks for a partial UTF-8 character
                    yield chunk(i, {"content": o.delta_text}, lp)
                if o.finish_reason is not None:
                    done[i] = True
                    reason = tool_finish(o.finish_reason, tools[i].calls if tools is not None else [])
                    yield chunk(i, {}, None, reason, **constraint_fields(o))
            if out.finished:
                break
            out = await rest.__anext__()
    except StopAsyncIteration:
        pass
    except Exception as e:  # mid-stream failure: an error event, then [DONE]
        yield sse(from_exception(e).body())
        yield SSE_DONE
        return
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  (aborts the engine request if unfinished)
    if include_usage:
        n_gen = sum(len(o.token_ids) for o in last.outputs)
        yield chat_usage_chunk(head, usage(len(last.prompt_token_ids), n_gen, last.metrics.num_cached_prompt_tokens))
    yield SSE_DONE
