"""The support assistant over HTTP: lmstack's OpenAI-compatible server (and its web chat) with every chat
request grounded in the knowledge base first.

    serve_support("runs/quickstart/finetune/final", "runs/quickstart/rag/index.sqlite", port=8000)

:class:`GroundingMiddleware` is an ASGI wrapper around :func:`lmstack.serve.api.create_app`: on
``POST /v1/chat/completions`` it reads the JSON body, retrieves passages for the last user message (and the
best one for the user message before it), and puts them into the system message -- the same
:func:`lmstack.apps.support.retrieval.context_hits` + :func:`lmstack.rag.with_context` the fine-tuning chats,
the evaluation and :class:`~lmstack.apps.support.assistant.SupportAssistant` use. A request without a
system message gets the assistant's system prompt. With a ``reader`` (the default of ``serve_support``),
a plain chat request is then answered like ``lmstack support chat`` answers: the model picks the passage
sentence that answers (:mod:`lmstack.apps.support.reader`), returned as an OpenAI ``chat.completion`` or its
event stream. Everything else (other routes, bodies that are not a chat request, requests with ``n`` > 1,
tools or logprobs) passes to the server untouched, so its own validation and errors apply.

Hostile clients: a request the server refuses unread (no or wrong API key, draining) passes on before its body
is read, so it costs no retrieval; a body is read under the server's ``max_request_bytes`` and refused (413) as
soon as it passes it, chunked or not; JSON parsing, retrieval and the reader run in worker threads, never on
the event loop. Passages and messages are the server's untrusted text: the chat route encodes control tokens
typed in them as plain text, and the reader's text prompt gets them broken up (:func:`defang`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Callable

from lmstack.apps.support.dialogues import SYSTEM_PROMPT
from lmstack.apps.support.retrieval import DEFAULT_K, context_hits, guard_hits
from lmstack.guard.asgi import OutputGuard, attach_metrics, audited, bearer_key, blocked_reply, count_status
from lmstack.serve.api.app import DEFAULT_MAX_REQUEST_BYTES, authorized, read_body, replay_body
from lmstack.serve.api.chat import chat_choice, chat_chunk, chat_completion, chat_head, chat_usage_chunk
from lmstack.serve.api.common import SSE_DONE, check_prompt_bytes, usage
from lmstack.serve.api.errors import APIError
from lmstack.serve.api.protocol import utf8_size
from lmstack.text import content_text


def ground_messages(messages: list[dict[str, Any]], retriever: Any, k: int = DEFAULT_K,
                    system_prompt: str = SYSTEM_PROMPT, context_max_chars: int | None = None,
                    hits_out: list | None = None, guard: Any = None, key: str | None = None,
                    units: tuple[Any, int] | None = None) -> list[dict[str, Any]]:
    """OpenAI-style ``messages`` with the retrieved passages in the (first) system message (the passages are
    appended to ``hits_out`` when given). With a ``guard`` (lmstack.guard), the passages are sanitized first:
    instruction-like sentences inside them (indirect prompt injection) are cut out."""
    from lmstack.rag import with_context

    users = [content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    users = [u for u in users if u.strip()]
    if not users:
        return messages
    hits = guard_hits(context_hits(retriever, users[-1], users[-2:-1], k=k), guard, key)
    if units is not None:  # context "units": the (reader, n) top answer units of the passages, best first
        from lmstack.apps.support.reader import unit_hits

        hits = unit_hits(units[0], users[-1], hits, units[1])
    if hits_out is not None:
        hits_out.extend(hits)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = with_context(content_text(out[0].get("content")), hits, context_max_chars)
    else:
        out.insert(0, {"role": "system", "content": with_context(system_prompt, hits, context_max_chars)})
    return out


WORD_JOINER = "\u2060"  # invisible, and no tokenizer merges it into a control token


def control_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens as strings, longest first."""
    ids = getattr(tokenizer, "special_token_ids", None)
    if ids is not None:
        toks = [tokenizer.id_to_token(i) for i in ids]
    else:
        toks = list(getattr(tokenizer, "all_special_tokens", []))
    return tuple(sorted({t for t in toks if t and len(t) > 1 and not t.isspace()}, key=len, reverse=True))


def defang(text: str, tokens: tuple[str, ...]) -> str:
    """``text`` with every control token in it broken by a word joiner after its first character, so a text
    prompt built from it never encodes to a control id (the chat route encodes them as plain text instead)."""
    for t in tokens:
        if t in text:
            text = text.replace(t, t[0] + WORD_JOINER + t[1:])
    return text


def undefang(text: str, tokens: tuple[str, ...]) -> str:
    """The inverse of :func:`defang`."""
    for t in tokens:
        text = text.replace(t[0] + WORD_JOINER + t[1:], t)
    return text


def _selectable(req: dict[str, Any], names: list[str]) -> bool:
    """A plain chat request the reader can answer (anything else goes to the server, which validates it)."""
    msgs = req.get("messages")
    return (req.get("model") in names and isinstance(msgs, list) and bool(msgs) and isinstance(msgs[-1], dict)
            and msgs[-1].get("role") == "user" and req.get("n") in (None, 1) and not req.get("tools")
            and not req.get("logprobs") and not req.get("response_format"))


def _completion(req: dict[str, Any], answer: str, prompt_tokens: int, completion_tokens: int,
                finish: str = "stop") -> tuple[bytes, bytes]:
    """(content type, body) of an OpenAI ``chat.completion`` -- or its event stream -- carrying ``answer``, built
    by the server's own response functions (:mod:`lmstack.serve.api.chat`)."""
    head = chat_head(req.get("model"))
    use = usage(prompt_tokens, completion_tokens)
    if not req.get("stream"):
        body = chat_completion(head, [chat_choice(0, answer, finish)], use)
        return b"application/json", json.dumps(body, ensure_ascii=False).encode()
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    events = [chat_chunk(head, 0, {"role": "assistant", "content": ""}, include_usage=include_usage),
              chat_chunk(head, 0, {"content": answer}, include_usage=include_usage),
              chat_chunk(head, 0, {}, finish_reason=finish, include_usage=include_usage)]
    if include_usage:
        events.append(chat_usage_chunk(head, use))
    events.append(SSE_DONE)
    return b"text/event-stream", "".join(events).encode()


class GroundingMiddleware:
    """ASGI middleware: ground ``/v1/chat/completions`` requests in retrieved passages (module docstring)."""

    def __init__(self, app: Callable, retriever: Any, k: int = DEFAULT_K, system_prompt: str = SYSTEM_PROMPT,
                 context_max_chars: int | None = None, *, reader: Any = None, tokenizer: Any = None,
                 model_names: list[str] | None = None, api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_REQUEST_BYTES, guard: Any = None, units: tuple[Any, int] | None = None,
                 copy: tuple[float, float] | None = None, copy_prior: tuple[Any, float] | None = None,
                 cite: bool = False):
        self.app, self.retriever, self.k = app, retriever, k
        self.guard = guard  # lmstack.guard.Guard (--guard policy.yaml): input, passage and output rails
        self.system_prompt, self.context_max_chars = system_prompt, context_max_chars
        # with a reader, plain chat requests are answered by selection (lmstack.apps.support.reader), as
        # `lmstack support chat` answers; everything else goes to the server's generation
        self.reader, self.tokenizer, self.model_names, self.api_key = reader, tokenizer, model_names or [], api_key
        self.max_body = max_body
        self.units = units  # (no-model reader, n): prompts show the top n answer units (context "units")
        # (bias, start_bias): generated answers get the `copy` extra -- the shown passages' answer units and the
        # fixed replies, quoted more cheaply than paraphrased (grounded decoding), unless the request brings its own
        self.copy = copy if copy and any(copy) else None
        # (no-model reader, weight): each quotable text also gets weight x its ranker log-probability
        self.copy_prior = copy_prior if copy_prior and copy_prior[1] else None
        self.cite = cite  # quotes run on into their passage's citation marker (a model tuned to cite)
        self._lock = threading.Lock()
        if guard is not None:
            attach_metrics(guard, app)  # /metrics: lmstack_guard_decisions_total{stage, rail, action}

    def _authorized(self, scope: dict) -> bool:
        return self.api_key is None or authorized(scope, self.api_key)

    def _refused(self, scope: dict) -> bool:
        """The server answers this request without reading its body (401 no or wrong key, 503 draining)."""
        lifecycle = getattr(getattr(self.app, "state", None), "lifecycle", None)
        return not self._authorized(scope) or bool(lifecycle is not None and lifecycle.draining)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not (scope.get("type") == "http" and scope.get("method") == "POST"
                and scope.get("path") == "/v1/chat/completions") or self._refused(scope):
            # other routes, and requests the server refuses unread: no body read, no retrieval
            return await self.app(scope, receive, send)
        body = await read_body(scope, receive, self.max_body)
        if isinstance(body, APIError):  # over the server's limit: it answers 413 (and counts it)
            if body.status == 413 and b"content-length" not in dict(scope.get("headers") or []):
                count_status(self.app, scope, 413)  # answered here (the stream was read): counted here
                return await body.response()(scope, receive, send)
            return await self.app(scope, receive, send)
        if body.disconnected:
            return
        key = bearer_key(scope)
        async with audited(self.guard, scope, key):  # with a guard that keeps an audit log: one row per request
            await self._serve(scope, receive, send, body, key)

    async def _serve(self, scope: dict, receive: Callable, send: Callable, body: Any, key: str | None) -> None:
        grounded = await asyncio.to_thread(self._ground, body.data, key)  # JSON + rails + retrieval: off the loop
        data = body.data
        if grounded is not None:
            req, hits, data = grounded
            if not isinstance(hits, list):  # an input rail blocked it: refusal or error per policy, no retrieval
                status, ctype, out = blocked_reply(self.guard, req, hits)
                if status == 200:  # the polite refusal, in the app's own answer shape
                    return await self._reply(req, hits.message or hits.text, "content_filter", scope, send)
                count_status(self.app, scope, status)
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", ctype), (b"content-length", str(len(out)).encode())]})
                return await send({"type": "http.response.body", "body": out})
            if self.reader is not None and _selectable(req, self.model_names):
                return await self._select(req, hits, scope, receive, send, key)
            if self.guard is not None:  # the model's answer passes the output rails on its way out
                send = OutputGuard(self.guard, [h.chunk.text for h in hits], key, bool(req.get("stream")), send)
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
                 + [(b"content-length", str(len(data)).encode())]}
        await self.app(scope, replay_body(data, receive), send)
        if isinstance(send, OutputGuard):
            await send.finish()

    def _ground(self, body: bytes, key: str | None = None) -> tuple[dict, Any, bytes] | None:
        """(request, passages, grounded body) of a JSON chat request; None for anything else (the server's own
        validation answers it). With a guard, the input rails run first (PII redacted in the user turns; a
        blocked request comes back as (request, its verdict, b"")) and the retrieved passages are
        sanitized (instructions inside them cut out) before they reach the prompt."""
        try:
            req = json.loads(body)
            if not (isinstance(req, dict) and isinstance(req.get("messages"), list)):
                return None
            if self.guard is not None:
                from lmstack.guard.serving import guard_chat_request

                req, verdict = guard_chat_request(self.guard, req, key=key)
                if verdict.blocked:
                    return req, verdict, b""
            hits: list = []
            with self._lock:  # one retriever (one SQLite connection) shared by the worker threads
                req["messages"] = ground_messages(req["messages"], self.retriever, self.k, self.system_prompt,
                                                  self.context_max_chars, hits_out=hits, guard=self.guard, key=key,
                                                  units=self.units)
            if self.copy is not None and "copy" not in req:
                from lmstack.apps.support.reader import quote_texts

                users = [content_text(m.get("content")) for m in req["messages"] if isinstance(m, dict)
                         and m.get("role") == "user"]
                prior, weight = self.copy_prior or (None, 0.0)
                texts, weights = quote_texts(hits, users[-1] if users else "", prior=prior, weight=weight,
                                             cite=self.cite)
                req["copy"] = {"texts": texts, "bias": self.copy[0], "start_bias": self.copy[1]}
                if weights is not None:
                    req["copy"]["weights"] = weights
            return req, hits, json.dumps(req, ensure_ascii=False).encode()
        except (ValueError, TypeError, AttributeError, RecursionError):
            return None

    async def _reply(self, req: dict[str, Any], answer: str, finish: str, scope: dict, send: Callable) -> None:
        ctype, body = _completion(req, answer, 0, 0, finish)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": body})

    async def _select(self, req: dict[str, Any], hits: list, scope: dict, receive: Callable,
                      send: Callable, key: str | None = None) -> None:
        msgs = [{"role": m.get("role"), "content": content_text(m.get("content"))} for m in req["messages"]]
        try:  # the checks the server runs before tokenizing (lone surrogates, prompt size)
            size = sum(utf8_size(m["content"], f"messages[{i}].content") for i, m in enumerate(msgs))
            served = getattr(getattr(self.app, "state", None), "model", None)  # None: a bare ASGI app behind us
            if served is not None:  # (the body cap, max_body, still bounds what reaches the reader)
                check_prompt_bytes(served, size, "messages")
        except APIError as e:
            return await e.response()(scope, receive, send)
        # template, tokenizer and the reader's scoring are CPU-bound: off the event loop
        answer, n_prompt, n_answer = await asyncio.to_thread(self._answer, msgs, hits)
        finish = "stop"
        if self.guard is not None:
            from lmstack.guard.serving import guard_chat_response

            v = await asyncio.to_thread(guard_chat_response, self.guard, answer, [h.chunk.text for h in hits], key)
            answer, finish = (v.message or v.text, "content_filter") if v.blocked else (v.text, "stop")
        ctype, body = _completion(req, answer, n_prompt, n_answer, finish)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": body})

    def _answer(self, msgs: list[dict[str, str]], hits: list) -> tuple[str, int, int]:
        """(selected answer, prompt tokens, answer tokens). The reader scores a text prompt, so control tokens
        typed in the messages or the passages are broken up first (:func:`defang`): they stay visible text."""
        import dataclasses

        tokens = control_token_strings(self.tokenizer)
        msgs = [{**m, "content": defang(m["content"], tokens)} for m in msgs]
        # the candidates are passage sentences, scored as the reply's text: broken up the same way
        hits = [dataclasses.replace(h, chunk=dataclasses.replace(h.chunk, text=defang(h.chunk.text, tokens)))
                if dataclasses.is_dataclass(h) else h for h in hits]
        prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        answer = undefang(self.reader.answer(prompt, msgs[-1]["content"], hits), tokens)  # the passage's own text
        return answer, len(self.tokenizer.encode(prompt)), len(self.tokenizer.encode(answer))


def create_support_app(llm: Any, retriever: Any, *, k: int = DEFAULT_K, system_prompt: str = SYSTEM_PROMPT,
                       context_max_chars: int | None = None, reader: Any = None, guard: Any = None,
                       units: tuple[Any, int] | None = None, copy: tuple[float, float] | None = None,
                       copy_prior: tuple[Any, float] | None = None, cite: bool = False,
                       **app_kw: Any) -> GroundingMiddleware:
    """:func:`lmstack.serve.api.create_app` for ``llm``, wrapped in :class:`GroundingMiddleware` (with a
    ``reader``, plain chat requests get the selected answer, as in ``lmstack support chat``)."""
    from lmstack.serve.api.app import create_app

    app = create_app(llm, **app_kw)
    wrapped = GroundingMiddleware(app, retriever, k, system_prompt, context_max_chars, reader=reader,
                                  tokenizer=app.state.model.tokenizer, model_names=list(app.state.model.names),
                                  api_key=app_kw.get("api_key"), max_body=app.state.max_request_bytes, guard=guard,
                                  units=units, copy=copy, copy_prior=copy_prior, cite=cite)
    wrapped.state = app.state  # type: ignore[attr-defined]  (the served model, for callers and tests)
    return wrapped


def serve_support(model: str, index: str, *, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                  k: int = DEFAULT_K, system_prompt: str = SYSTEM_PROMPT, api_key: str | None = None,
                  device: str | None = None, dtype: str | None = None, max_num_seqs: int = 16,
                  log_level: str = "info", drain_timeout: float = 30.0, mode: str = "select",
                  ranker: str | None = None, guard: str | None = None, context: str = "passages",
                  units: int = 4, copy_bias: float = 0.0, copy_start_bias: float = 0.0,
                  copy_prior: float = 0.0, cite: bool = False) -> None:
    """Serve the grounded support assistant on ``host:port`` until SIGTERM / Ctrl-C. Blocks."""
    import logging

    from lmstack.apps.support.retrieval import open_kb_retriever
    from lmstack.serve.api.server import build_server
    from lmstack.serve.llm import load

    retriever = open_kb_retriever(index)  # fails at once on a bad index path, before the model loads
    unit_ctx = prior = None
    guided = bool(copy_prior and (copy_bias or copy_start_bias))
    if context == "units" or guided:  # one no-model reader orders the units and weighs the quotes
        from lmstack.apps.support.assistant import unit_reader

        no_model = unit_reader(ranker)
        unit_ctx = (no_model, units) if context == "units" else None
        prior = (no_model, copy_prior) if guided else None
    policy = None
    if guard is not None:
        from lmstack.guard import load_policy

        policy = load_policy(guard)  # a bad policy fails here, in one line, before the model loads
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = load(model, adapter=adapter, device=device, dtype=dtype, max_num_seqs=max_num_seqs)
    reader = None
    if mode == "select":
        from lmstack.apps.support.reader import Reader

        reader = Reader.load(model, adapter=adapter, device=device, ranker=ranker, llm=llm)  # one load
    rails = None
    if policy is not None:
        from lmstack.guard.asgi import guard_for

        rails = guard_for(policy, llm)  # the perplexity rail, when enabled, scores with the served model
    app = create_support_app(llm, retriever, k=k, system_prompt=system_prompt, api_key=api_key, reader=reader,
                             guard=rails, units=unit_ctx, copy=(copy_bias, copy_start_bias), copy_prior=prior,
                             cite=cite)
    logging.getLogger("lmstack.support").info(
        "support assistant %s grounded in %s (%d passages) at http://%s:%d  (web chat at /, OpenAI API at /v1)",
        model, index, len(retriever), host, port)
    build_server(app, host, port, log_level, drain_timeout).run()
