"""Guardrails around lmstack's OpenAI-compatible server, as ASGI wrappers (no change to the server itself).

    app = GuardMiddleware(create_app(llm), Guard.from_policy("policy.yaml"))     # lmstack serve --guard FILE

:class:`GuardMiddleware` runs the input rails on every ``POST /v1/chat/completions`` before the server sees it
(PII redacted in the user turns; a blocked request is answered with the policy's message and ``finish_reason``
"content_filter", and never reaches the model) and passes the server's answer through :class:`OutputGuard`.
Requests the server refuses unread (no or wrong API key, draining) pass before their body is read: no rail
runs for a client that is not authorized. The support app's grounding middleware uses :class:`OutputGuard`
with the retrieved passages (the grounding rail checks the answer against them).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from lmstack.serve.api.app import DEFAULT_MAX_REQUEST_BYTES, authorized, read_body, replay_body
from lmstack.serve.api.chat import chat_choice, chat_chunk, chat_completion, chat_head
from lmstack.serve.api.common import SSE_DONE, usage
from lmstack.serve.api.errors import APIError


def guard_for(policy: Any, llm: Any = None) -> Any:
    """A :class:`lmstack.guard.Guard` for a served ``llm`` (lmstack.serve.llm.LLM): a policy that enables the
    perplexity rail (NeMo Guardrails' length-per-perplexity and prefix/suffix perplexity heuristics) gets the
    served model as its scorer. ``policy``: a path, or an already validated GuardPolicy."""
    from lmstack.guard import Guard, load_policy

    pol = load_policy(policy) if not hasattr(policy, "input") else policy
    scorer = None
    if pol.input.perplexity and pol.input.perplexity.enabled and llm is not None:
        from lmstack.guard.perplexity import model_perplexity

        scorer = model_perplexity(llm.model, llm.tokenizer)
    return Guard(pol, scorer=scorer)


def count_status(app: Any, scope: dict, code: int) -> None:
    """Count a response a wrapper answered itself in the server's ``lmstack_http_requests`` metric (the server's
    gate counts everything it answers; a 413 for a chunked body read by a wrapper never reaches it)."""
    metrics = getattr(getattr(getattr(app, "state", None), "model", None), "metrics", None)
    if metrics is not None and getattr(metrics, "requests", None) is not None:
        metrics.requests.labels(scope.get("path", "other"), str(code)).inc()


def bearer_key(scope: dict) -> str | None:
    """The request's API key (rate limits and the audit log use a hash of it), or its client address."""
    for k, v in scope.get("headers") or []:
        if k == b"authorization" and v[:7].lower() == b"bearer ":
            return v[7:].decode("latin-1")
    client = scope.get("client")
    return f"{client[0]}" if client else None


def refusal(req: dict[str, Any], text: str, finish: str = "content_filter") -> tuple[bytes, bytes]:
    """(content type, body): an OpenAI chat answer (or its event stream) carrying ``text``."""
    head = chat_head(req.get("model"))
    if not req.get("stream"):
        return b"application/json", json.dumps(chat_completion(head, [chat_choice(0, text, finish)], usage(0, 0)),
                                                ensure_ascii=False).encode()
    events = [chat_chunk(head, 0, {"role": "assistant", "content": text}),
              chat_chunk(head, 0, {}, finish_reason=finish), SSE_DONE]
    return b"text/event-stream", "".join(events).encode()


class OutputGuard:
    """An ASGI ``send`` that passes the server's chat answer through the guard's output rails: a JSON
    ``chat.completion`` is checked whole (redacted, or replaced by the block message with ``finish_reason``
    "content_filter"); an event stream is checked window by window (:class:`lmstack.guard.guard.StreamChecker`):
    text is released as it clears, and a blocked answer ends there with "content_filter" (the rest of the
    model's stream is dropped). Anything that is not a 200 chat answer passes untouched."""

    def __init__(self, guard: Any, passages: list[str], key: str | None, stream: bool, send: Callable):
        from lmstack.guard.guard import GuardContext

        self.guard, self.passages, self.key, self.stream, self._send = guard, passages, key, stream, send
        self.checker = guard.stream(GuardContext(key=key, passages=passages)) if stream else None
        self.status, self.buf, self.head, self.done, self.last = 0, b"", None, False, None

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message.get("status", 200)
            if self.status != 200:
                return await self._send(message)
            headers = [(k, v) for k, v in message.get("headers") or [] if k != b"content-length"]
            self.head = {**message, "headers": headers}
            if self.stream:
                await self._send(self.head)
            return
        if message["type"] != "http.response.body" or self.status != 200:
            return await self._send(message)
        self.buf += message.get("body", b"")
        if self.stream:
            await self._events(final=not message.get("more_body", False))
        elif not message.get("more_body", False):
            await self._whole()

    async def _whole(self) -> None:
        from lmstack.guard.serving import guard_chat_response

        body = self.buf
        try:
            doc = json.loads(body)
            msg = doc["choices"][0]["message"]
            if isinstance(msg.get("content"), str):
                v = await asyncio.to_thread(guard_chat_response, self.guard, msg["content"], self.passages, self.key)
                msg["content"] = v.message or v.text if v.blocked else v.text
                if v.blocked:
                    doc["choices"][0]["finish_reason"] = "content_filter"
                body = json.dumps(doc, ensure_ascii=False).encode()
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        self.head["headers"] = self.head["headers"] + [(b"content-length", str(len(body)).encode())]
        await self._send(self.head)
        await self._send({"type": "http.response.body", "body": body})
        self.done = True

    async def _events(self, final: bool) -> None:
        *events, self.buf = self.buf.split(b"\n\n")
        out = []
        for ev in events:
            if self.done or not ev.startswith(b"data: "):
                continue
            if ev == b"data: [DONE]":
                continue
            try:
                chunk = json.loads(ev[6:])
                choice = chunk["choices"][0] if chunk.get("choices") else None
            except (ValueError, KeyError, IndexError, TypeError):
                out.append(ev)
                continue
            self.last = chunk
            if choice is None:  # the usage chunk
                out.append(ev)
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                delta["content"] = self.checker.feed(delta["content"])
                if self.checker.stopped:
                    out.append(self._finish_event(chunk, self.checker.verdict.message or "", "content_filter"))
                    self.done = True
                    continue
            if choice.get("finish_reason"):
                rest = self.checker.close()
                blocked = self.checker.verdict is not None and self.checker.verdict.blocked
                delta["content"] = (delta.get("content") or "") + (
                    (self.checker.verdict.message or "") if blocked else rest)
                if blocked:
                    choice["finish_reason"] = "content_filter"
            out.append(b"data: " + json.dumps(chunk, ensure_ascii=False).encode())
        body = b"".join(e + b"\n\n" for e in out)
        if final:
            body += b"data: [DONE]\n\n"
        if body or final:
            await self._send({"type": "http.response.body", "body": body, "more_body": not final})

    @staticmethod
    def _finish_event(chunk: dict, text: str, finish: str) -> bytes:
        c = json.loads(json.dumps(chunk))
        c["choices"][0]["delta"] = {"content": text} if text else {}
        c["choices"][0]["finish_reason"] = finish
        return b"data: " + json.dumps(c, ensure_ascii=False).encode()

    async def finish(self) -> None:
        """After the app returned: a stream that never ended its body is ended here."""
        if self.stream and self.status == 200 and not self.done and self.buf:
            await self._events(final=True)


class GuardMiddleware:
    """ASGI middleware: the guard's rails around ``/v1/chat/completions`` (module docstring)."""

    def __init__(self, app: Callable, guard: Any, *, api_key: str | list[str] | None = None,
                 max_body: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app, self.guard, self.api_key, self.max_body = app, guard, api_key, max_body
        self.state = getattr(app, "state", None)  # the served model and lifecycle, for the server and tests

    def _refused(self, scope: dict) -> bool:
        lifecycle = getattr(self.state, "lifecycle", None)
        return (self.api_key is not None and not authorized(scope, self.api_key)) or bool(
            lifecycle is not None and lifecycle.draining)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not (scope.get("type") == "http" and scope.get("method") == "POST"
                and scope.get("path") == "/v1/chat/completions") or self._refused(scope):
            return await self.app(scope, receive, send)
        body = await read_body(scope, receive, self.max_body)
        if isinstance(body, APIError) or body.disconnected:  # over the limit: the server answers 413 itself
            if isinstance(body, APIError) and body.status == 413 and b"content-length" not in dict(scope.get("headers") or []):
                count_status(self.app, scope, 413)
                return await body.response()(scope, receive, send)
            return None if not isinstance(body, APIError) else await self.app(scope, receive, send)
        key = bearer_key(scope)
        checked = await asyncio.to_thread(self._check, body.data, key)
        if checked is None:  # not a JSON chat request: the server's own validation answers it
            return await self.app(scope, replay_body(body.data, receive), send)
        req, data, blocked = checked
        if blocked is not None:
            ctype, out = refusal(req, blocked)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", ctype), (b"content-length", str(len(out)).encode())]})
            return await send({"type": "http.response.body", "body": out})
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
                 + [(b"content-length", str(len(data)).encode())]}
        out_send = OutputGuard(self.guard, [], key, bool(req.get("stream")), send)
        await self.app(scope, replay_body(data, receive), out_send)
        await out_send.finish()

    def _check(self, body: bytes, key: str | None) -> tuple[dict, bytes, str | None] | None:
        from lmstack.guard.serving import guard_chat_request

        try:
            req = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not (isinstance(req, dict) and isinstance(req.get("messages"), list)):
            return None
        req, v = guard_chat_request(self.guard, req, key=key)
        if v.blocked:
            return req, b"", v.message or v.text
        return req, json.dumps(req, ensure_ascii=False).encode(), None


__all__ = ["GuardMiddleware", "OutputGuard", "bearer_key", "count_status", "guard_for", "refusal"]
