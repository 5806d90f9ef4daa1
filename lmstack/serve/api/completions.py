"""``POST /v1/completions`` (the legacy text API): one engine request per prompt, ``n`` completions each.

Choice ``index`` is ``prompt_index * n + completion_index`` (as OpenAI orders batched prompts).
``echo`` prepends the prompt text; ``logprobs: k`` returns the legacy parallel-list shape
(``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``); both together also give the prompt's own
log-probs (the first token's is null), scored beside the engine (``lmstack.serve.scoring``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from lmstack.serve.api import protocol as P
from lmstack.serve.api.common import (
    SSE_DONE, ServedModel, cache_salt, check_context, check_prompt_bytes, check_structured, completion_logprobs,
    constraint_fields, finish_reason,
    first_then_rest, merge, sse,
    tracked_generate, usage,
)
from lmstack.serve.api.errors import APIError, from_exception
from lmstack.serve.types import RequestOutput


def _encode(model: ServedModel, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each prompt (run in a worker thread: a long prompt takes a while to tokenize)."""
    vocab = model.vocab_size
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = list(model.tokenizer.encode(p))
        else:
            ids = list(p)
            bad = [t for t in ids if t < 0 or (isinstance(vocab, int) and t >= vocab)]
            if bad:
                raise APIError(400, f"prompt[{i}] has token id {bad[0]} outside the vocabulary "
                               f"[0, {vocab}).", param="prompt")
        if not ids:
            raise APIError(400, f"prompt[{i}] encodes to zero tokens.", param="prompt")
        out.append(ids)
    return out


async def create_completion(model: ServedModel, req: P.CompletionRequest):
    P.check_unsupported(req)
    P.check_ranges(req, model.vocab_size)
    prompts, sizes = P.completion_prompts(req)
    for i, size in enumerate(sizes):  # before any tokenizing
        check_prompt_bytes(model, size, "prompt" if len(sizes) == 1 else f"prompt[{i}]")
    ids = await asyncio.to_thread(_encode, model, prompts)  # off the event loop
    k = P.completion_logprobs_k(req)
    want = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    if want < 1:
        raise APIError(400, "max_tokens must be >= 1.", param="max_tokens")
    max_tokens = min(check_context(model, len(x), want, "prompt") for x in ids)
    structured, sparam = P.structured_output(req)
    params = P.sampling_params(req, max_tokens=max_tokens, logprobs=k, vocab_size=model.vocab_size,
                               cache_salt=cache_salt(req.cache_salt), structured=structured,
                               watermark=model.watermark)
    await asyncio.to_thread(check_structured, model, params, sparam)
    cid = f"cmpl-{uuid.uuid4().hex}"
    # Admit every prompt concurrently before answering 200, so a 429 / 400 / 503 keeps its status.
    gens = [tracked_generate(model, x, params, cid if len(ids) == 1 else f"{cid}-{p}") for p, x in enumerate(ids)]
    firsts = await asyncio.gather(*(first_then_rest(g, "prompt") for g in gens), return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        for g in gens:
            await g.aclose()
        raise failed
    streams = [_prepend(first, rest) for first, rest in firsts]  # type: ignore[misc]
    echo = [_echo_text(model, p, x) if req.echo else "" for p, x in zip(prompts, ids)]
    echo_lp: list[dict[str, Any] | None] = [None] * len(ids)
    if req.echo and k is not None:  # prompt log-probs: one scoring pass per prompt, beside the engine's steps
        engine = getattr(model.engine, "engine", model.engine)
        try:
            for p, x in enumerate(ids):
                lps = await asyncio.to_thread(engine.score_prompt, x, k)
                echo_lp[p] = prompt_logprobs(model, x, lps, k)
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
    head = dict(id=cid, created=int(time.time()), model=model.name, system_fingerprint=None)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(model, head, streams, req.n, k, echo, include_usage, echo_lp),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for p, out in merge(streams):
        finals[p] = out
    choices, n_prompt, n_gen, n_cached = [], 0, 0, 0
    for p, out in enumerate(finals):
        assert out is not None
        n_prompt += len(out.prompt_token_ids)
        n_cached += out.metrics.num_cached_prompt_tokens
        for o in out.outputs:
            n_gen += len(o.token_ids)
            choices.append({
                "index": p * req.n + o.index, "text": echo[p] + o.text,
                "logprobs": join_logprobs(echo_lp[p], completion_logprobs(model, o.logprobs, k or 0, len(echo[p])))
                if k is not None else None,
                "finish_reason": finish_reason(o.finish_reason), **constraint_fields(o),
            })
    choices.sort(key=lambda c: c["index"])
    return JSONResponse({**head, "object": "text_completion", "choices": choices,
                         "usage": usage(n_prompt, n_gen, n_cached)})


def prompt_logprobs(model: ServedModel, ids: list[int], lps: list, k: int) -> dict[str, Any]:
    """The legacy shape for the prompt's tokens: the first has no log-prob (null), as OpenAI's echo gives."""
    rest = completion_logprobs(model, [lp for lp in lps if lp is not None], k, len(model.token_text(ids[0])))
    assert rest is not None
    first = model.token_text(ids[0])
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def join_logprobs(head: dict[str, Any] | None, tail: dict[str, Any] | None) -> dict[str, Any] | None:
    if head is None or tail is None:
        return tail
    return {key: head[key] + tail[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _echo_text(model: ServedModel, prompt: str | list[int], ids: list[int]) -> str:
    return prompt if isinstance(prompt, str) else model.tokenizer.decode(ids)


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        if not first.finished:
            async for out in rest:
                yield out
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _stream(model: ServedModel, head: dict[str, Any], streams: list, n: int, k: int | None,
                  echo: list[str], include_usage: bool,
                  echo_lp: list[dict[str, Any] | None] | None = None) -> AsyncIterator[str]:
    base = {**head, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    sent: dict[int, int] = {}
    offset: dict[int, int] = {}
    finals: dict[int, RequestOutput] = {}
    done: set[int] = set()

    def chunk(index: int, text: str, lp: Any = None, reason: str | None = None) -> str:
        return sse({**base, "choices": [{"index": index, "text": text, "logprobs": lp,
                                         "finish_reason": reason}], **extra})

    try:
        async for p, out in merge(streams):
            finals[p] = out
            for o in out.outputs:
                i = p * n + o.index
                if i in done:
                    continue
                if i not in sent:
                    sent[i], offset[i] = 0, len(echo[p])
                    if echo[p]:
                        yield chunk(i, echo[p], echo_lp[p] if echo_lp else None)
                new = len(o.token_ids) - sent[i]
                lp = None
                if k is not None and o.logprobs is not None and new > 0:
                    lp = completion_logprobs(model, o.logprobs[sent[i]:sent[i] + new], k, offset[i])
                sent[i] = len(o.token_ids)
                if o.delta_text or lp is not None or o.finish_reason is not None:
                    offset[i] += len(o.delta_text)
                    if o.finish_reason is not None:
                        done.add(i)
                    yield chunk(i, o.delta_text, lp, finish_reason(o.finish_reason))
    except Exception as e:  # mid-stream failure: an error event, then [DONE]
        yield sse(from_exception(e).body())
        yield SSE_DONE
        return
    finally:
        for s in streams:
            await s.aclose()
    if include_usage:
        n_prompt = sum(len(f.prompt_token_ids) for f in finals.values())
        n_gen = sum(len(o.token_ids) for f in finals.values() for o in f.outputs)
        n_cached = sum(f.metrics.num_cached_prompt_tokens for f in finals.values())
        yield sse({**base, "choices": [], "usage": usage(n_prompt, n_gen, n_cached)})
    yield SSE_DONE
