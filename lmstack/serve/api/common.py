"""What chat and completions share: the served state, tracked generation, SSE framing, usage, logprobs.

``tracked_generate`` is the one place the HTTP layer talks to the engine: it times time-to-first-token,
inter-token latency and end-to-end latency for Prometheus, and aborts the engine request whenever the
consumer goes away early (client disconnect, error, stop button) so its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from lmstack.serve.api.errors import APIError, from_exception
from lmstack.serve.errors import EngineShuttingDown, QueueFull
from lmstack.serve.types import RequestOutput, SamplingParams, TokenLogprob


# perf_counter() when the request reached the server (set by the Gate middleware): latency metrics start here,
# so time-to-first-token includes body parsing, tokenization and the chat template.
REQUEST_ARRIVAL: ContextVar[float | None] = ContextVar("lmstack_request_arrival", default=None)
# the prefix-cache salt of the API key the request was made with (set by the Gate; None on an open server)
TENANT: ContextVar[str | None] = ContextVar("lmstack_tenant", default=None)


def cache_salt(request_salt: str | None) -> str | None:
    """The request's prefix-cache namespace: its tenant (API key), then the ``cache_salt`` it sent, if any. A
    client can narrow its own namespace but never reach another key's."""
    tenant = TENANT.get()
    if tenant is None and request_salt is None:
        return None
    return f"{tenant or ''}\0{request_salt or ''}"


@dataclass
class ServedModel:
    """Everything a route needs: the engine, its tokenizer, names, limits, metrics and lifecycle."""

    engine: Any  # AsyncEngine-like: generate(prompt, params, request_id), abort(id), stats(), shutdown()
    tokenizer: Any
    names: list[str]  # served model names; names[0] is reported in responses
    max_model_len: int
    metrics: Any = None  # ServerMetrics
    vocab_size: int | None = None  # the model's embedding rows (token-id prompts must be below it)
    max_prompt_bytes: int = 0  # UTF-8 bytes of prompt text read at most (refused before tokenizing); 0: default
    # keyword that makes the tokenizer's apply_chat_template encode control tokens typed inside messages as
    # plain text ({"sanitize": True} for lmstack's, {"sanitize_control_tokens": True} for transformers'); {}: off
    sanitize_kw: dict[str, bool] = field(default_factory=dict)
    # server-wide generation watermark (lmstack serve --watermark-key): {key, gamma, delta, context_width, scheme}
    # applied to every request; None: only requests that send their own `watermark` object are marked
    watermark: dict[str, Any] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.max_prompt_bytes:
            self.max_prompt_bytes = default_max_prompt_bytes(self.max_model_len)

    @property
    def name(self) -> str:
        return self.names[0]

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to (cached; byte-level pieces may be partial characters)."""
        s = self._token_text.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = s
        return s


# Bytes of prompt text per context token that are read before a prompt is refused unread. A token of a
# byte-level BPE is a few bytes on average (about 4 for English); 64 per token leaves room for long tokens (runs
# of spaces, code) while a 10 MB prompt to a 4K-context model is refused before it costs a tokenizer pass.
PROMPT_BYTES_PER_TOKEN = 64


def default_max_prompt_bytes(max_model_len: int) -> int:
    return max(64 * 1024, PROMPT_BYTES_PER_TOKEN * max_model_len)


def check_structured(model: ServedModel, params: SamplingParams, param: str) -> None:
    """Compile the request's constraint before admission (run in a worker thread): a bad schema, grammar or regex
    is a 400 naming ``param`` with the compiler's reason, and the engine step later finds it compiled (cached)."""
    if params.structured is None:
        return
    from lmstack.serve.structured import StructuredError

    engine = getattr(model.engine, "engine", model.engine)
    compile_ = getattr(engine, "structured_factory", None)
    if compile_ is None:
        raise APIError(400, "this server's engine does not support structured output.", param=param)
    try:
        compile_(params.structured)
    except StructuredError as e:
        raise APIError(400, f"{e}.", param=param) from None


def constraint_fields(o: Any) -> dict[str, Any]:
    """lmstack's extra choice fields for a constrained request: whether the output completed its constraint, and
    a warning when max_tokens cut it short (the text then does not parse)."""
    sat = getattr(o, "constraint_satisfied", None)
    if sat is None or o.finish_reason is None:
        return {}
    out: dict[str, Any] = {"constraint_satisfied": sat}
    if not sat:
        out["warning"] = ("the output ended (finish_reason: " + str(o.finish_reason) + ") before it completed the "
                          "requested format; it will not parse. Raise max_tokens.")
    return out


def check_prompt_bytes(model: ServedModel, size: int, param: str) -> None:
    """400 naming the limit when the prompt text is over ``model.max_prompt_bytes`` (checked before tokenizing:
    tokenizing megabytes only to refuse them costs seconds of CPU)."""
    if size > model.max_prompt_bytes:
        raise APIError(400, f"The prompt is {size} bytes of text; this server tokenizes at most "
                       f"{model.max_prompt_bytes} bytes ({PROMPT_BYTES_PER_TOKEN} bytes per token of its "
                       f"{model.max_model_len}-token context). Shorten the prompt.", param=param,
                       code="context_length_exceeded")


def check_context(model: ServedModel, prompt_len: int, max_tokens: int | None, param: str) -> int:
    """The max_tokens to use; 400 naming the limit when the prompt (plus max_tokens) does not fit."""
    limit = model.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                       f"has {prompt_len} tokens. Shorten the prompt.", param=param,
                       code="context_length_exceeded")
    if max_tokens is None:
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                       "completion). Shorten the prompt or lower max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


async def tracked_generate(model: ServedModel, prompt: str | list[int], params: SamplingParams,
                           request_id: str) -> AsyncIterator[RequestOutput]:
    """``engine.generate`` plus latency metrics; aborts the engine request if not consumed to the end."""
    m = model.metrics
    t0 = REQUEST_ARRIVAL.get() or time.perf_counter()
    last: float | None = None
    finished = False
    try:
        async with contextlib.aclosing(model.engine.generate(prompt, params, request_id)) as agen:
            async for out in agen:
                if any(o.delta_token_ids for o in out.outputs):
                    now = time.perf_counter()
                    if m is not None:
                        (m.ttft.observe(now - t0) if last is None else m.itl.observe(now - last))
                    last = now
                finished = out.finished
                yield out
                if finished:
                    break
    except (QueueFull, EngineShuttingDown):
        finished = True  # refused at admission: the engine never held it, and the answer needs no engine step
        raise
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                await asyncio.shield(model.engine.abort(request_id))
        if m is not None:
            m.e2e.observe(time.perf_counter() - t0)


async def first_then_rest(agen: AsyncIterator[RequestOutput], param: str) -> tuple[RequestOutput, AsyncIterator]:
    """Pull the first snapshot before answering 200, so admission errors (429, 400, 503) keep their status."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:  # pragma: no cover - the engine always yields a final snapshot
        raise APIError(500, "engine returned no output", type="server_error") from None
    except BaseException as e:
        with contextlib.suppress(Exception):
            await agen.aclose()  # type: ignore[attr-defined]
        if isinstance(e, Exception):
            raise from_exception(e, param) from e
        raise
    return first, agen


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (stream index, item), in arrival order."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    left = len(tasks)
    try:
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()  # type: ignore[attr-defined]
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(obj: Any) -> str:
    """One server-sent event: ``data: <json>\\n\\n``."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(reason: str | None) -> str | None:
    return reason  # "stop" | "length" | "abort" (OpenAI has no abort; vLLM reports it the same way)


def chat_logprobs(model: ServedModel, lps: list[TokenLogprob] | None, k: int) -> dict[str, Any] | None:
    """OpenAI chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    if lps is None:
        return None

    def entry(tid: int, lp: float) -> dict[str, Any]:
        text = model.token_text(tid)
        return {"token": text, "logprob": max(float(lp), -9999.0), "bytes": list(text.encode("utf-8"))}

    content = []
    for t in lps:
        e = entry(t.token_id, t.logprob)
        top = sorted(t.top.items(), key=lambda kv: -kv[1])[:k]
        e["top_logprobs"] = [entry(tid, lp) for tid, lp in top]
        content.append(e)
    return {"content": content}


def completion_logprobs(model: ServedModel, lps: list[TokenLogprob] | None, k: int,
                        offset: int) -> dict[str, Any] | None:
    """Legacy completions shape: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset`` (character offset of each token in the returned text, starting at ``offset``)."""
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for t in lps:
        text = model.token_text(t.token_id)
        tokens.append(text)
        token_lps.append(max(float(t.logprob), -9999.0))
        top = sorted(t.top.items(), key=lambda kv: -kv[1])[:k]
        alts: dict[str, float] = {}
        for tid, lp in top:  # two ids can decode to the same text: keep the likelier one
            alts.setdefault(model.token_text(tid), max(float(lp), -9999.0))
        tops.append(alts if k else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
