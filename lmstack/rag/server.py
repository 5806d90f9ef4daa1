"""``lmstack serve --rag INDEX``: the OpenAI server with every chat request answered from a document index,
and the sources in the response.

:class:`RagMiddleware` wraps the server's ASGI app (:func:`lmstack.serve.api.create_app`):

- ``POST /v1/chat/completions``: the last user message is the query; the top ``k`` chunks go into the system
  message as numbered sources (:func:`lmstack.rag.answer.rag_system`, after the client's own system message
  when it sent one). The response gets an extra top-level field ``sources``: every retrieved chunk (number,
  source, title, heading path, page, character offsets, text, score) with ``cited`` true for those the answer
  cites as ``[n]``. A streamed response carries it in one extra event just before ``data: [DONE]``
  (``{"object": "chat.completion.chunk", "choices": [], "sources": [...]}``). With the ``openai`` client:
  ``resp.model_extra["sources"]``. A request may send ``"rag": false`` to skip retrieval, or
  ``"rag": {"k": 3, "source": "manuals/*.pdf"}``.
- ``GET /v1/rag``: the index's name and size (the web chat shows source cards and an upload button when it
  answers 200).
- ``POST /v1/rag/documents?name=FILE.pdf`` (the file's bytes as the body; ``--rag-upload`` only): the file is
  saved under the index's upload folder and indexed incrementally (same settings); 201 with the report.

Hostile clients: a request the server refuses unread (no or wrong API key, draining) passes on before its body is
read; bodies are read under the server's ``max_request_bytes``; JSON parsing, retrieval and indexing run in worker
threads; an upload's name is reduced to a plain file name with a supported suffix.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from lmstack.rag.answer import citations, rag_system, sources
from lmstack.serve.api.app import DEFAULT_MAX_REQUEST_BYTES, authorized, read_body, replay_body
from lmstack.serve.api.errors import APIError
from lmstack.text import content_text

DEFAULT_K = 5


def _json_response(status: int, obj: Any) -> tuple[dict, dict]:
    body = json.dumps(obj, ensure_ascii=False).encode()
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
            {"type": "http.response.body", "body": body})


def _error(status: int, message: str, code: str = "invalid_request_error") -> tuple[dict, dict]:
    return _json_response(status, {"error": {"message": message, "type": code, "param": None, "code": None}})


class RagMiddleware:
    """ASGI middleware: ground chat requests in a document index and return their sources (module docstring)."""

    def __init__(self, app: Callable, retriever: Any, *, k: int = DEFAULT_K, api_key: Any = None,
                 max_body: int = DEFAULT_MAX_REQUEST_BYTES, upload_dir: str | Path | None = None,
                 index_kw: dict[str, Any] | None = None, system: str | None = None, max_chars: int | None = 6000):
        self.app, self.retriever, self.k, self.api_key, self.max_body = app, retriever, k, api_key, max_body
        self.upload_dir = Path(upload_dir) if upload_dir is not None else None
        self.index_kw = index_kw or {}
        self.system, self.max_chars = system, max_chars
        self._lock = threading.Lock()  # one retriever (one SQLite connection) shared by the worker threads
        self.state = getattr(app, "state", None)

    def _refused(self, scope: dict) -> bool:
        lifecycle = getattr(getattr(self.app, "state", None), "lifecycle", None)
        return (self.api_key is not None and not authorized(scope, self.api_key)) or bool(
            lifecycle is not None and lifecycle.draining)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path, method = scope.get("path"), scope.get("method")
        if scope.get("type") != "http" or self._refused(scope):
            return await self.app(scope, receive, send)  # the server answers 401 / 503 itself
        if path == "/v1/rag" and method == "GET":
            return await self._send(send, *_json_response(200, self.info()))
        if path == "/v1/rag/documents" and method == "POST":
            return await self._upload(scope, receive, send)
        if path != "/v1/chat/completions" or method != "POST":
            return await self.app(scope, receive, send)
        body = await read_body(scope, receive, self.max_body)
        if isinstance(body, APIError):
            return await self.app(scope, receive, send) if b"content-length" in dict(scope.get("headers") or []) \
                else await body.response()(scope, receive, send)
        if body.disconnected:
            return
        grounded = await asyncio.to_thread(self._ground, body.data)
        data, hits = (body.data, None) if grounded is None else grounded
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
                 + [(b"content-length", str(len(data)).encode())]}
        await self.app(scope, replay_body(data, receive), send if hits is None else _WithSources(send, hits))

    @staticmethod
    async def _send(send: Callable, start: dict, body: dict) -> None:
        await send(start)
        await send(body)

    def info(self) -> dict[str, Any]:
        r = self.retriever
        return {"index": r.path.name, "documents": int(r.meta.get("documents", 0)), "chunks": len(r),
                "dense_model": r.meta.get("dense_model"), "k": self.k, "upload": self.upload_dir is not None}

    def _ground(self, raw: bytes) -> tuple[bytes, list] | None:
        """(grounded body, hits) of a chat request with a user message; None for anything else (the server's
        own validation answers it)."""
        try:
            req = json.loads(raw)
            if not (isinstance(req, dict) and isinstance(req.get("messages"), list)):
                return None
            opts = req.pop("rag", None)
            if opts is False:
                return json.dumps(req, ensure_ascii=False).encode(), None  # type: ignore[return-value]
            opts = opts if isinstance(opts, dict) else {}
            msgs = req["messages"]
            users = [content_text(m.get("content")) for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
            users = [u for u in users if u.strip()]
            if not users:
                return None
            k = opts.get("k", self.k)
            k = k if isinstance(k, int) and 0 < k <= 50 else self.k
            source = opts.get("source") if isinstance(opts.get("source"), str) else None
            with self._lock:
                hits = self.retriever.search(users[-1][:4000], k, source=source)
            system = None
            if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
                system = content_text(msgs[0].get("content")).strip() or None
                msgs = msgs[1:]
            grounded = rag_system(hits, system or self.system, max_chars=self.max_chars)
            req["messages"] = [{"role": "system", "content": grounded}, *msgs]
            return json.dumps(req, ensure_ascii=False).encode(), hits
        except (ValueError, TypeError, AttributeError, RecursionError):
            return None

    async def _upload(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.upload_dir is None:
            return await self._send(send, *_error(404, "this server does not accept uploads (start it with "
                                                        "--rag-upload)", "not_found_error"))
        from lmstack.rag.loaders import SUFFIXES

        query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        name = Path((query.get("name") or [""])[0].replace("\\", "/")).name
        name = re.sub(r"[^\w.\- ]", "_", name).strip(". ")
        if not name or Path(name).suffix.lower() not in SUFFIXES:
            return await self._send(send, *_error(400, f"name must be a file name ending in one of "
                                                       f"{', '.join(SUFFIXES)}"))
        body = await read_body(scope, receive, self.max_body)
        if isinstance(body, APIError):
            return await body.response()(scope, receive, send)
        if body.disconnected:
            return
        if not body.data:
            return await self._send(send, *_error(400, "the body is empty: send the file's bytes"))
        report = await asyncio.to_thread(self._index_upload, name, body.data)
        status = 201 if not report["failed"] else 422
        await self._send(send, *_json_response(status, report))

    def _index_upload(self, name: str, data: bytes) -> dict[str, Any]:
        from lmstack.rag.index import index_documents

        assert self.upload_dir is not None
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        (self.upload_dir / name).write_bytes(data)
        with self._lock:
            rep = index_documents([self.upload_dir], self.retriever.path, embedder=self.retriever.embedder,
                                  keep_others=True, prefix="uploads/", **self.index_kw)
            self.retriever.refresh()
        return {"name": name, "added": rep.added, "updated": rep.updated, "failed": [
            {"source": s, "reason": r} for s, r in rep.failed], "chunks": rep.chunks_total,
            "documents": rep.documents_total}


class _WithSources:
    """An ASGI ``send`` that adds ``sources`` to a 200 chat response: into the JSON body, or as one event before
    ``data: [DONE]`` of an event stream."""

    def __init__(self, send: Callable, hits: list):
        self.send, self.hits = send, hits
        self.mode = None  # "json" | "sse" | None (pass through: an error)
        self.buf, self.text, self.head = b"", [], {}

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers") or []).get(b"content-type", b"")
            if message.get("status") == 200:
                self.mode = "sse" if ctype.startswith(b"text/event-stream") else "json"
            if self.mode == "json":
                self.start = message  # sent with the body (its length changes)
                return
            return await self.send(message)
        if message["type"] != "http.response.body" or self.mode is None:
            return await self.send(message)
        self.buf += message.get("body", b"")
        if self.mode == "json":
            if message.get("more_body"):
                return
            try:
                obj = json.loads(self.buf)
                answer = "".join(content_text((c.get("message") or {}).get("content")) for c in obj.get("choices", []))
                obj["sources"] = sources(self.hits, citations(answer, len(self.hits)))
                out = json.dumps(obj, ensure_ascii=False).encode()
            except (ValueError, AttributeError, TypeError):
                out = self.buf
            headers = [(k, v) for k, v in self.start.get("headers") or [] if k != b"content-length"]
            await self.send({**self.start, "headers": headers + [(b"content-length", str(len(out)).encode())]})
            return await self.send({"type": "http.response.body", "body": out})
        out = b""
        while b"\n\n" in self.buf:
            event, self.buf = self.buf.split(b"\n\n", 1)
            data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
            if data == b"[DONE]":
                out += self._sources_event()
            elif data:
                try:
                    chunk = json.loads(data)
                    self.head = {k: chunk.get(k) for k in ("id", "created", "model")}
                    self.text += [(c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or []]
                except (ValueError, AttributeError, TypeError):
                    pass
            out += event + b"\n\n"
        if not message.get("more_body", False) and self.buf:
            out, self.buf = out + self.buf, b""
        await self.send({"type": "http.response.body", "body": out, "more_body": message.get("more_body", False)})

    def _sources_event(self) -> bytes:
        text = "".join(t for t in self.text if isinstance(t, str))
        ev = {**self.head, "object": "chat.completion.chunk", "choices": [],
              "sources": sources(self.hits, citations(text, len(self.hits)))}
        return b"data: " + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n"


def rag_wrap(index: str | Path, *, k: int = DEFAULT_K, upload: bool = False, embedder: Any = "auto",
             api_key: Any = None, rerank: str | Path | None = None, rerank_depth: int = 20) -> Callable:
    """The ``wrap(app, llm)`` hook of :func:`lmstack.serve.api.run_server` for ``lmstack serve --rag INDEX``.
    The index (and the ``rerank`` reranker, :func:`lmstack.rag.rerankers.load_reranker`) are opened here: a bad
    path fails before the model loads."""
    from lmstack.rag.index import DocRetriever

    reranker = None
    if rerank is not None:
        from lmstack.rag.rerankers import load_reranker

        reranker = load_reranker(rerank)
    retriever = DocRetriever(index, embedder=embedder, reranker=reranker, rerank_depth=rerank_depth)
    upload_dir = Path(index).with_name(Path(index).stem + ".uploads") if upload else None
    settings = {key: retriever.meta[key] for key in ("chunk_tokens", "overlap", "han") if key in retriever.meta}

    def wrap(app: Any, llm: Any) -> Any:
        return RagMiddleware(app, retriever, k=k, api_key=api_key, max_body=app.state.max_request_bytes,
                             upload_dir=upload_dir, index_kw=settings)

    wrap.retriever = retriever  # type: ignore[attr-defined]
    return wrap
