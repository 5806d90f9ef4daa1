"""``POST /v1/chat/completions``: the chat template, then one engine request with ``n`` completions.

Response and chunk shapes follow the OpenAI API reference (``chat.completion`` and
``chat.completion.chunk``): the first chunk of each choice carries ``delta.role``, content chunks carry
``delta.content``, the last chunk of each choice carries ``finish_reason``; with
``stream_options.include_usage`` every chunk has ``usage: null`` and one final chunk with no choices
carries the usage; the stream ends with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from lmstack.serve.api import protocol as P
from lmstack.serve.api.common import (
    SSE_DONE, ServedModel, cache_salt, chat_logprobs, check_context, check_prompt_bytes, finish_reason,
    first_then_rest, sse,
    tracked_generate, usage,
)
from lmstack.serve.api.errors import APIError, from_exception
from lmstack.serve.types import RequestOutput


def _prompt_ids(model: ServedModel, msgs: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """The chat template's token ids (run in a worker thread: a long conversation takes a while). Every message
    is the client's text: control tokens typed inside it (``<|im_end|>``) are encoded as plain text, so no
    message can close its turn or open a system turn (``model.sanitize_kw``, on by default)."""
    try:
        ids = model.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, **model.sanitize_kw)
    except Exception as e:  # a template that rejects the conversation (e.g. roles must alternate)
        raise APIError(400, f"The chat template rejected these messages: {e}", param="messages") from e
    return list(ids)


async def create_chat_completion(model: ServedModel, req: P.ChatCompletionRequest):
    P.check_unsupported(req)
    P.check_ranges(req, model.vocab_size)
    msgs, size = P.chat_messages(req)
    check_prompt_bytes(model, size, "messages")  # before any tokenizing
    # template + tokenizer off the event loop: other requests (and /health) are answered meanwhile
    prompt_ids = await asyncio.to_thread(_prompt_ids, model, msgs, req.add_generation_prompt)
    k = P.chat_logprobs_k(req)
    want = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if want is not None and want < 1:
        raise APIError(400, "max_tokens must be >= 1.", param="max_tokens")
    max_tokens = check_context(model, len(prompt_ids), want, "messages")
    params = P.sampling_params(req, max_tokens=max_tokens, logprobs=k, logprobs_param="top_logprobs",
                               vocab_size=model.vocab_size,
                               cache_salt=cache_salt(req.cache_salt))
    head = chat_head(model.name)
    first, rest = await first_then_rest(tracked_generate(model, prompt_ids, params, head["id"]), "messages")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(model, head, first, rest, req.n, k, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    final = first
    try:
        if not final.finished:
            async for out in rest:
                final = out
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  (cancelled by a disconnect: abort the request)
    return JSONResponse(_full(model, head, final, k))


# ------------------------------------------------------------------------------ response shapes
# The one builder of chat.completion bodies and chunks: the routes below and the support app's answers
# (lmstack/apps/support/server.py) both use these.
def chat_head(model_name: str | None) -> dict[str, Any]:
    """The fields every body and chunk of one response shares (a fresh ``chatcmpl-`` id)."""
    return dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name,
                system_fingerprint=None)


def chat_choice(index: int, content: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One choice of a ``chat.completion`` body."""
    return {"index": index,
            "message": {"role": "assistant", "content": content, "refusal": None, "tool_calls": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(head: dict[str, Any], choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
    """A whole ``chat.completion`` body (``use``: :func:`~lmstack.serve.api.common.usage`)."""
    return {**head, "object": "chat.completion", "choices": choices, "usage": use}


def chat_chunk(head: dict[str, Any], index: int, delta: dict[str, Any], logprobs: Any = None,
               finish_reason: str | None = None, include_usage: bool = False) -> str:
    """One ``chat.completion.chunk`` event for choice ``index`` (with ``usage: null`` when the stream will end
    with a usage chunk)."""
    extra = {"usage": None} if include_usage else {}
    return sse({**head, "object": "chat.completion.chunk", "choices": [
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}], **extra})


def chat_usage_chunk(head: dict[str, Any], use: dict[str, Any]) -> str:
    """The last event before ``[DONE]`` with ``stream_options.include_usage``: no choices, the usage."""
    return sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": use})


def _full(model: ServedModel, head: dict[str, Any], out: RequestOutput, k: int | None) -> dict[str, Any]:
    choices = [chat_choice(o.index, o.text, finish_reason(o.finish_reason),
                           chat_logprobs(model, o.logprobs, k or 0) if k is not None else None)
               for o in out.outputs]
    n_gen = sum(len(o.token_ids) for o in out.outputs)
    return chat_completion(head, choices,
                           usage(len(out.prompt_token_ids), n_gen, out.metrics.num_cached_prompt_tokens))


async def _stream(model: ServedModel, head: dict[str, Any], first: RequestOutput,
                  rest: AsyncIterator[RequestOutput], n: int, k: int | None,
                  include_usage: bool) -> AsyncIterator[str]:
    sent = [0] * n  # tokens already streamed per choice (for slicing cumulative logprobs)
    started = [False] * n
    done = [False] * n

    def chunk(index: int, delta: dict[str, Any], lp: Any = None, reason: str | None = None) -> str:
        return chat_chunk(head, index, delta, lp, reason, include_usage)

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
                if o.delta_text or lp is not None:  # no empty chunks for a partial UTF-8 character
                    yield chunk(i, {"content": o.delta_text}, lp)
                if o.finish_reason is not None:
                    done[i] = True
                    yield chunk(i, {}, None, finish_reason(o.finish_reason))
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
