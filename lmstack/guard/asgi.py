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


def blocked_reply(guard: Any, req: dict[str, Any], verdict: Any) -> tuple[int, bytes, bytes]:
    """(status, content type, body) for a request an input rail blocked, per the policy's ``on_block``: a polite
    refusal (200, the rail's message, ``finish_reason`` "content_filter") or an OpenAI-shaped error (400 code
    "content_filter"; 429 "rate_limit_exceeded" for the rate limit)."""
    message = verdict.message or verdict.text
    if getattr(guard.policy, "on_block", "refuse") == "error":
        rail = next((r.rail for r in verdict.results if r.action == "block"), "")
        err = (APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded") if rail == "input.rate_limit"
               else APIError(400, message, param="messages", code="content_filter"))
        return err.status, b"application/json", json.dumps(err.body(), ensure_ascii=False).encode()
    ctype, body = refusal(req, message)
    return 200, ctype, body


class OutputGuard:
    """An ASGI ``send`` that passes the server's chat answer through the guard's output rails: a JSON
    ``chat.completion`` has each choice checked whole (redacted, or replaced by the block message with
    ``finish_reason`` "content_filter"); an event stream is checked window by window, one
    :class:`lmstack.guard.guard.StreamChecker` per choice index (``n > 1``: each choice is its own answer):
    text is released as it clears, and a blocked choice ends there with "content_filter" (the rest of that
    choice's stream is dropped; the other choices go on). Anything that is not a 200 chat answer passes
    untouched. ``record``: the request's audit record (:meth:`lmstack.guard.Guard.begin`)."""

    def __init__(self, guard: Any, passages: list[str], key: str | None, stream: bool, send: Callable,
                 record: Any = None):
        self.guard, self.passages, self.key, self.stream, self._send = guard, passages, key, stream, send
        self.record = record
        from lmstack.guard.guard import CURRENT_PLACEHOLDERS

        self.placeholders = CURRENT_PLACEHOLDERS.get()  # reversible PII of this request, put back in the answer
        self.checkers: dict[int, Any] = {}
        self.stopped: set[int] = set()  # choices a rail ended
        self.status, self.buf, self.head, self.done, self.last = 0, b"", None, False, None

    def _ctx(self) -> Any:
        from lmstack.guard.guard import GuardContext

        return GuardContext(key=self.key, passages=self.passages, record=self.record, placeholders=self.placeholders)

    def checker(self, index: int) -> Any:
        c = self.checkers.get(index)
        if c is None:
            c = self.checkers[index] = self.guard.stream(self._ctx())
        return c

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
        body = self.buf
        try:
            doc = json.loads(body)
            changed = False
            for choice in doc["choices"]:
                msg = choice["message"]
                if isinstance(msg.get("content"), str):
                    v = await asyncio.to_thread(self.guard.check_output, msg["content"], self._ctx())
                    if v.blocked:
                        msg["content"] = v.message or v.text
                    else:
                        from lmstack.text.pii import restore

                        msg["content"] = restore(v.text, self.placeholders or {})
                    if v.blocked:
                        choice["finish_reason"] = "content_filter"
                    changed = True
            if changed:
                body = json.dumps(doc, ensure_ascii=False).encode()
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        self.head["headers"] = self.head["headers"] + [(b"content-length", str(len(body)).encode())]
        await self._send(self.head)
        await self._send({"type": "http.response.body", "body": body})
        self.done = True

    def _choice(self, chunk: dict, choice: dict) -> bool:
        """Pass one streamed choice through its checker (in place); False: drop it (its choice was stopped)."""
        i = choice.get("index", 0)
        if not isinstance(i, int) or i in self.stopped:
            return False
        c = self.checker(i)
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            delta["content"] = c.feed(delta["content"])
            if c.stopped:
                choice["delta"] = {"content": c.verdict.message} if c.verdict.message else {}
                choice["finish_reason"] = "content_filter"
                self.stopped.add(i)
                return True
        if choice.get("finish_reason"):
            rest = c.close()
            blocked = c.verdict is not None and c.verdict.blocked
            choice["delta"] = {**delta, "content": (delta.get("content") or "") + (
                (c.verdict.message or "") if blocked else rest)}
            if blocked:
                choice["finish_reason"] = "content_filter"
            self.stopped.add(i)
        return True

    async def _events(self, final: bool) -> None:
        *events, self.buf = self.buf.split(b"\n\n")
        out = []
        for ev in events:
            if self.done or not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            try:
                chunk = json.loads(ev[6:])
                choices = chunk["choices"]
                if not isinstance(choices, list):
                    raise TypeError
            except (ValueError, KeyError, IndexError, TypeError):
                out.append(ev)
                continue
            self.last = chunk
            if not choices:  # the usage chunk
                out.append(ev)
                continue
            kept = [ch for ch in choices if isinstance(ch, dict) and await asyncio.to_thread(self._choice, chunk, ch)]
            if kept:
                chunk["choices"] = kept
                out.append(b"data: " + json.dumps(chunk, ensure_ascii=False).encode())
        body = b"".join(e + b"\n\n" for e in out)
        if final:
            body += b"data: [DONE]\n\n"
            self.done = True
        if body or final:
            await self._send({"type": "http.response.body", "body": body, "more_body": not final})

    async def finish(self) -> None:
        """After the app returned: a stream that never ended its body is ended here."""
        if self.stream and self.status == 200 and not self.done:
            await self._events(final=True)


class audited:
    """``async with audited(guard, scope, key) as record:`` -- one request's guard state: its reversible PII
    placeholders (:data:`lmstack.guard.guard.CURRENT_PLACEHOLDERS`) and one audit row: every check
    made while serving it (in this task or in its ``asyncio.to_thread`` workers) adds to ``record`` through
    :data:`lmstack.guard.guard.CURRENT_RECORD`, and the row is written at the end, whatever happened (a failed
    write is a logged warning). No audit log in the policy: nothing is recorded."""

    def __init__(self, guard: Any, scope: dict, key: str | None):
        self.guard, self.scope, self.key, self.record, self.token = guard, scope, key, None, None

    async def __aenter__(self) -> Any:
        from lmstack.guard.guard import CURRENT_PLACEHOLDERS, CURRENT_RECORD

        self.ph_token = CURRENT_PLACEHOLDERS.set({})  # this request's reversible PII placeholders
        if self.guard is not None and self.guard.audit is not None:
            self.record = self.guard.begin(key=self.key, route=self.scope.get("path"))
            self.token = CURRENT_RECORD.set(self.record)
        return self.record

    async def __aexit__(self, *exc: Any) -> None:
        from lmstack.guard.guard import CURRENT_PLACEHOLDERS, CURRENT_RECORD

        CURRENT_PLACEHOLDERS.reset(self.ph_token)
        if self.token is not None:
            CURRENT_RECORD.reset(self.token)
        if self.record is not None:
            await asyncio.to_thread(self.guard.finish, self.record)


def attach_metrics(guard: Any, app: Any) -> None:
    """Count every rail decision in the server's ``/metrics``: ``lmstack_guard_decisions_total{stage, rail,
    action}`` (one per rail that acted; a stage no rail acted on counts as ``rail="none", action="allow"``)."""
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if getattr(metrics, "registry", None) is None:
        return
    counter = getattr(metrics, "guard_decisions", None)
    if counter is None:
        from prometheus_client import Counter

        counter = metrics.guard_decisions = Counter("lmstack_guard_decisions", "Guard rail decisions, by stage, "
                                                    "rail and action.", ["stage", "rail", "action"],
                                                    registry=metrics.registry)
    _observe(guard, counter)


def _observe(guard: Any, counter: Any) -> None:
    def count(stage: str, v: Any) -> None:
        if not v.results:
            counter.labels(stage, "none", "allow").inc()
        for r in v.results:
            counter.labels(stage, r.rail.split(".", 1)[-1], r.action).inc()

    guard.observe(count)


class GuardMiddleware:
    """ASGI middleware: the guard's rails around ``/v1/chat/completions`` (module docstring)."""

    def __init__(self, app: Callable, guard: Any, *, api_key: str | list[str] | None = None,
                 max_body: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app, self.guard, self.api_key, self.max_body = app, guard, api_key, max_body
        self.state = getattr(app, "state", None)  # the served model and lifecycle, for the server and tests
        attach_metrics(guard, app)

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
        async with audited(self.guard, scope, key):  # one audit row for the request
            checked = await asyncio.to_thread(self._check, body.data, key)
            if checked is None:  # not a JSON chat request: the server's own validation answers it
                return await self.app(scope, replay_body(body.data, receive), send)
            req, data, blocked = checked
            if blocked is not None:
                status, ctype, out = blocked_reply(self.guard, req, blocked)
                if status != 200:
                    count_status(self.app, scope, status)
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", ctype), (b"content-length", str(len(out)).encode())]})
                return await send({"type": "http.response.body", "body": out})
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
                     + [(b"content-length", str(len(data)).encode())]}
            from lmstack.guard.serving import tool_passages

            # the answer is grounded in the request's tool outputs (sanitized above); none: grounding does not run
            out_send = OutputGuard(self.guard, tool_passages(req), key, bool(req.get("stream")), send)
            await self.app(scope, replay_body(data, receive), out_send)
            await out_send.finish()

    def _check(self, body: bytes, key: str | None) -> tuple[dict, bytes, Any] | None:
        from lmstack.guard.serving import guard_chat_request

        try:
            req = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not (isinstance(req, dict) and isinstance(req.get("messages"), list)):
            return None
        req, v = guard_chat_request(self.guard, req, key=key)
        if v.blocked:
            return req, b"", v
        return req, json.dumps(req, ensure_ascii=False).encode(), None


__all__ = ["GuardMiddleware", "OutputGuard", "attach_metrics", "audited", "bearer_key", "blocked_reply", "count_status", "guard_for", "refusal"]
