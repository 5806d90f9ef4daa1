"""The FastAPI app: OpenAI routes, the web chat, health, metrics, auth, body limit and graceful drain.

``create_app(llm_or_engine, api_key=..., served_model_name=...)`` builds one app around one engine.
Request path::

    Gate (ASGI): 401 bad key -> 503 draining -> 413 body too large -> count in-flight, status metrics
      -> route: parse (422) -> model name (404) -> params (400) -> engine (429 / 400 / 503) -> JSON or SSE

Draining (SIGTERM, see ``server.py``): ``lifecycle.begin_drain()`` makes new API requests and ``/health``
answer 503 while requests already in flight run to completion; ``lifecycle.wait_idle()`` returns when the
last one has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
import time
from importlib import resources
from typing import Any, Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from lmstack.errors import ConfigError
from lmstack.serve.api import errors as E
from lmstack.serve.api.chat import create_chat_completion
from lmstack.serve.api.common import REQUEST_ARRIVAL, TENANT, ServedModel
from lmstack.serve.api.completions import create_completion
from lmstack.serve.api.extras import EmbeddingRequest, ResponsesRequest, create_embeddings, create_response
from lmstack.serve.api.metrics import ServerMetrics
from lmstack.serve.api.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("lmstack.serve.api")

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
UI_FILES = {"app.js": "text/javascript; charset=utf-8", "markdown.js": "text/javascript; charset=utf-8",
            "style.css": "text/css; charset=utf-8"}
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/health",
          "/metrics", "/")


class Lifecycle:
    """In-flight API request count and the draining flag."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def begin_drain(self) -> None:
        if not self.draining:
            log.warning("draining: %d request(s) in flight finish; new requests get 503", self.in_flight)
        self.draining = True

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """True when no request is in flight (within ``timeout`` seconds)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class Gate:
    """ASGI middleware in front of every route: auth, drain, body limit, in-flight count, status counter."""

    def __init__(self, app: Any, *, api_key: str | Sequence[str] | None, max_request_bytes: int,
                 lifecycle: Lifecycle, metrics: ServerMetrics):
        self.app, self.keys, self.limit = app, api_keys(api_key), max_request_bytes
        self.lifecycle, self.metrics = lifecycle, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrival = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if not path.startswith("/v1/"):
                return await self.app(scope, receive, counting_send)
            key = matched_key(scope, self.keys) if self.keys else None
            if self.keys and key is None:
                return await E.unauthorized().response()(scope, receive, counting_send)
            if self.lifecycle.draining:
                return await E.shutting_down().response()(scope, receive, counting_send)
            body_receive = await self._read_body(scope, receive)
            if isinstance(body_receive, E.APIError):
                return await body_receive.response()(scope, receive, counting_send)
            self.lifecycle.enter()
            self.metrics.in_flight.inc()
            token = REQUEST_ARRIVAL.set(arrival)
            tenant = TENANT.set(tenant_salt(key) if key is not None else None)
            try:
                await self.app(scope, body_receive, counting_send)
            finally:
                TENANT.reset(tenant)
                REQUEST_ARRIVAL.reset(token)
                self.lifecycle.exit()
                self.metrics.in_flight.dec()
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()

    async def _read_body(self, scope: dict, receive: Callable) -> Callable | E.APIError:
        """Buffer the body (at most ``limit`` bytes), then replay it; later receives pass through."""
        body = await read_body(scope, receive, self.limit)
        if isinstance(body, E.APIError):
            return body
        return replay_body(body.data, receive)


class Body:
    """What :func:`read_body` read: ``data`` and whether the client went away before its end."""

    def __init__(self, data: bytes, disconnected: bool = False):
        self.data, self.disconnected = data, disconnected


async def read_body(scope: dict, receive: Callable, limit: int) -> Body | E.APIError:
    """Read a request body of at most ``limit`` bytes: a declared ``Content-Length`` over it is refused before
    reading, a chunked body as soon as the bytes read so far pass it (413, nothing more is read)."""
    headers = dict(scope.get("headers") or [])
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return E.too_large(int(declared), limit)
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return Body(b"".join(chunks), disconnected=True)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return E.too_large_streamed(size, limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return Body(b"".join(chunks))


def api_keys(api_key: str | Sequence[str] | None) -> list[str]:
    """The accepted keys: one string, several (one per tenant), or none (an open server)."""
    if api_key is None:
        return []
    keys = [api_key] if isinstance(api_key, str) else list(api_key)
    if not all(isinstance(k, str) and k for k in keys):
        raise ConfigError("api_key: every key must be a non-empty string")
    return keys


def matched_key(scope: dict, keys: Sequence[str]) -> str | None:
    """The key of ``keys`` the request carries as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (every key is
    compared, in constant time), or None."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"")
    token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
    found = None
    for key in keys:
        if hmac.compare_digest(token, key.encode()) and token:
            found = key
    return found


def authorized(scope: dict, api_key: str | Sequence[str]) -> bool:
    """The request carries one of the keys (see :func:`matched_key`)."""
    return matched_key(scope, api_keys(api_key)) is not None


def tenant_salt(key: str) -> str:
    """The prefix-cache salt of the requests made with ``key`` (a digest: the key itself is not passed on)."""
    return hashlib.sha256(b"lmstack-tenant\0" + key.encode()).hexdigest()[:32]


def replay_body(body: bytes, receive: Callable) -> Callable:
    """An ASGI ``receive`` that first returns the already-read ``body`` whole, then passes through to ``receive``
    (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(work)

    async def listen() -> None:
        while True:
            if (await request.receive())["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(listen())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)
    return task.result()


def _complete_schema(app: FastAPI, required: bool, names: list[str]) -> None:
    """Complete the OpenAPI schema: ``model`` is one of the served names, and ``/v1/*`` needs the API key (as a
    bearer token or ``X-API-Key``) when the server has one."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = base()  # caches itself in app.openapi_schema; completed in place below
        for body in ("ChatCompletionRequest", "CompletionRequest"):
            prop = schema.get("components", {}).get("schemas", {}).get(body, {}).get("properties", {}).get("model")
            if prop is not None:
                prop["enum"] = list(names)
        if required:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            for path, ops in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _is_engine(obj: Any) -> bool:
    """An AsyncEngine, or any object with its seam (async ``abort``, ``stats``), e.g. benchmarks/hf_engine.py's."""
    from lmstack.serve.async_engine import AsyncEngine

    return isinstance(obj, AsyncEngine) or (inspect.iscoroutinefunction(getattr(obj, "abort", None))
                                            and hasattr(obj, "stats"))


def sanitize_kw(tokenizer: Any) -> dict[str, bool]:
    """The ``apply_chat_template`` keyword that encodes control tokens inside messages as plain text."""
    try:
        params = inspect.signature(tokenizer.apply_chat_template).parameters
    except (AttributeError, TypeError, ValueError):
        params = {}
    if "sanitize_control_tokens" in params:  # transformers
        return {"sanitize_control_tokens": True}
    if "sanitize" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):  # lmstack (or a wrapper)
        return {"sanitize": True}
    raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) cannot encode control tokens typed in messages "
                      "as plain text, so a client could forge chat turns: use lmstack's or transformers' tokenizer, "
                      "or pass sanitize=False to serve trusted clients only")


def _served(obj: Any, *, served_model_name: str | list[str] | None, tokenizer: Any, max_model_len: int | None,
            max_waiting: int, max_prompt_bytes: int | None = None, sanitize: bool = True) -> ServedModel:
    if _is_engine(obj):
        engine, llm = obj, getattr(obj, "llm", None)
    else:
        from lmstack.serve.async_engine import AsyncEngine

        engine, llm = AsyncEngine(obj, max_waiting=max_waiting), obj
    tok = tokenizer or getattr(llm, "tokenizer", None) or getattr(engine, "tokenizer", None)
    if tok is None:
        raise ConfigError("the model directory has no tokenizer (tokenizer.json); the server needs one to read "
                          "prompts: copy the tokenizer files into it (lmstack.model.copy_tokenizer) or pass tokenizer=")
    name = served_model_name or getattr(llm, "model_name", None) or getattr(engine, "model_name", None) or "lmstack"
    names = [name] if isinstance(name, str) else list(name)
    mml = max_model_len or getattr(llm, "max_model_len", None) or getattr(engine, "max_model_len", None)
    if not mml:
        raise ConfigError("unknown context length: pass max_model_len= (CLI: --max-model-len)")
    cfg = getattr(getattr(llm, "model", None), "config", None)
    vocab = getattr(cfg, "vocab_size", None) or getattr(tok, "vocab_size", None)
    return ServedModel(engine=engine, tokenizer=tok, names=names, max_model_len=int(mml),
                       vocab_size=int(vocab) if isinstance(vocab, int) else None,
                       max_prompt_bytes=max_prompt_bytes or 0, sanitize_kw=sanitize_kw(tok) if sanitize else {})


def create_app(llm_or_engine: Any, api_key: str | Sequence[str] | None = None,
               served_model_name: str | list[str] | None = None, *, tokenizer: Any = None, max_model_len: int | None = None, max_waiting: int = 256,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, ui: bool = True,
               allowed_origins: list[str] | None = None, shutdown_engine: bool = True,
               max_prompt_bytes: int | None = None, sanitize: bool = True) -> FastAPI:
    """An OpenAI-compatible app around one model (an ``LLM`` from ``lmstack.serve.llm.load`` or an engine).

    ``api_key``: one key, or several (one per tenant: each key's requests share prefix-cache blocks only with
    requests made with the same key). ``max_prompt_bytes``: prompt text over this many UTF-8 bytes is refused
    (400) before it is tokenized (default: 64 bytes per token of the context, at least 64 KiB). ``sanitize``
    (default on): control tokens typed inside chat messages are encoded as plain text, never as control ids."""
    api_keys(api_key)  # a bad key list fails here, not at the first request
    model = _served(llm_or_engine, served_model_name=served_model_name, tokenizer=tokenizer,
                    max_model_len=max_model_len, max_waiting=max_waiting, max_prompt_bytes=max_prompt_bytes,
                    sanitize=sanitize)
    stats = getattr(model.engine, "stats", None)
    metrics = model.metrics = ServerMetrics(stats)
    lifecycle = Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        lifecycle.begin_drain()
        await lifecycle.wait_idle(timeout=30)
        if shutdown_engine and hasattr(model.engine, "shutdown"):
            with contextlib.suppress(Exception):
                await model.engine.shutdown(drain=True)

    app = FastAPI(title="lmstack", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.model, app.state.lifecycle, app.state.metrics = model, lifecycle, metrics
    app.state.max_request_bytes = max_request_bytes  # the support app's grounding reads bodies under it too
    E.install_handlers(app)

    def check_model(name: str) -> None:
        if name not in model.names:
            raise E.model_not_found(name, model.names)

    # each server-sent event: ``data:`` is one chunk as JSON, the last one ``[DONE]``
    sse_event = {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "a chunk object as JSON, or [DONE] at the end"}}}
    stream_or_json = {200: {"description": "The completion, or with `stream: true` its chunks as server-sent "
                            "events", "content": {"application/json": {"schema": {"type": "object"}},
                                                  "text/event-stream": {"schema": sse_event}}}}
    api_errors = E.documented(400, 401, 404, 405, 413, 422, 429, 500, 503)

    @app.post("/v1/chat/completions", responses={**stream_or_json, **api_errors})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        return await _cancel_on_disconnect(request, create_chat_completion(model, req))

    @app.post("/v1/completions", responses={**stream_or_json, **api_errors})
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        return await _cancel_on_disconnect(request, create_completion(model, req))

    @app.post("/v1/embeddings", responses=api_errors)
    async def embeddings(req: EmbeddingRequest, request: Request):
        check_model(req.model)
        return await _cancel_on_disconnect(request, create_embeddings(model, req))

    @app.post("/v1/responses", responses={**stream_or_json, **api_errors})
    async def responses(req: ResponsesRequest, request: Request):
        check_model(req.model)
        return await _cancel_on_disconnect(request, create_response(model, req))

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": model.created, "owned_by": "lmstack",
                "max_model_len": model.max_model_len}

    @app.get("/v1/models", responses=E.documented(401, 405, 500, 503))
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in model.names]}

    @app.get("/v1/models/{name:path}", responses=E.documented(401, 404, 405, 422, 500, 503))
    async def get_model(name: str):
        check_model(name)
        return model_card(name)

    @app.get("/health", responses={503: {"description": "Draining for shutdown",
                                         "content": {"application/json": {"schema": {"type": "object"}}}},
                                   **E.documented(405)})
    async def health():
        if lifecycle.draining:
            return JSONResponse({"status": "draining", "in_flight": lifecycle.in_flight}, status_code=503)
        return {"status": "ok", "model": model.name, "in_flight": lifecycle.in_flight}

    @app.get("/metrics", response_class=PlainTextResponse, responses=E.documented(405))
    async def prometheus():
        metrics.draining.set(1 if lifecycle.draining else 0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if ui:
        ui_dir = resources.files("lmstack.serve.ui")

        @app.get("/", response_class=HTMLResponse, responses=E.documented(405))
        async def index():
            html = (ui_dir / "index.html").read_text(encoding="utf-8")
            cfg = {"model": model.name, "maxModelLen": model.max_model_len, "needsKey": api_key is not None}
            return html.replace("/*__LMSTACK_CONFIG__*/{}", json.dumps(cfg))

        @app.get("/ui/{name}", response_class=Response, responses={
            200: {"description": "The web chat's scripts and style sheet",
                  "content": {t: {"schema": {"type": "string"}} for t in sorted(set(UI_FILES.values()))}},
            **E.documented(404, 405, 422)})
        async def ui_file(name: str):
            if name not in UI_FILES:  # only the page's own assets, never the package's other files
                raise E.APIError(404, f"no such file: /ui/{name}", type="not_found")
            return Response((ui_dir / name).read_bytes(), media_type=UI_FILES[name],
                            headers={"Cache-Control": "no-cache"})

    _complete_schema(app, bool(api_keys(api_key)), model.names)
    app.add_middleware(Gate, api_key=api_key, max_request_bytes=max_request_bytes, lifecycle=lifecycle,
                       metrics=metrics)
    if allowed_origins:  # outermost, so browser preflights are answered before auth
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"], max_age=600)
    return app
