"""``POST /v1/embeddings`` (mean-pooled hidden states) and a basic ``POST /v1/responses`` (the ``openai`` client's
default API), both on the served model.

Embeddings: each input (a string, a token list, or a list of either; at most :data:`MAX_INPUTS`) is one causal
forward pass; the vector is the mean over positions of the final normed hidden state (``hidden_size`` floats;
``encoding_format: "base64"`` gives little-endian float32 bytes, what the ``openai`` client asks for by default).
A decoder's mean-pooled states are a serviceable embedding, not a trained retrieval model's.

Responses: ``input`` (a string or a list of messages), ``instructions``, ``max_output_tokens``, ``temperature``,
``top_p``, ``text.format`` (``json_object`` / ``json_schema``), function ``tools`` and ``tool_choice``; it runs
through the chat route and answers a ``response`` object with ``message`` / ``function_call`` output items.
With ``stream: true`` the chat route's chunks become the Responses API's server-sent events, each
``event: <type>`` + ``data: <json>`` with a ``sequence_number``: ``response.created``, ``response.in_progress``,
for a message ``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta`` ...,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``; for each function call
``response.output_item.added``, ``response.function_call_arguments.delta`` / ``.done``, ``response.output_item.done``;
and last ``response.completed`` (``response.incomplete`` when ``max_output_tokens`` ran out) with the whole
response; a failure mid-stream is an ``error`` event. No ``[DONE]`` line (the Responses API has none).
Not implemented (400): ``previous_response_id`` (nothing is stored), built-in tools.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import Any, AsyncIterator, Union

from fastapi.responses import StreamingResponse

from pydantic import BaseModel, ConfigDict

from lmstack.serve.api import protocol as P
from lmstack.serve.api.common import ServedModel, check_prompt_bytes
from lmstack.serve.api.errors import APIError, bad_request

MAX_INPUTS = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: str = "float"
    dimensions: int | None = None


class ResponsesRequest(_Body):
    model: str
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    stream: bool = False
    previous_response_id: str | None = None
    seed: int | None = None  # lmstack extra
    metadata: dict[str, Any] | None = None


async def create_embeddings(model: ServedModel, req: EmbeddingRequest) -> dict[str, Any]:
    if req.encoding_format not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'.", param="encoding_format")
    if req.dimensions is not None:
        raise bad_request("dimensions is not supported: the vector is the model's hidden size.", param="dimensions")
    x = req.input
    items: list[str | list[int]]
    if isinstance(x, str):
        items = [x]
    elif x and all(isinstance(t, int) for t in x):
        items = [list(x)]  # type: ignore[arg-type]
    else:
        items = list(x)  # type: ignore[arg-type]
    if not items:
        raise bad_request("input must not be empty.", param="input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"input has {len(items)} entries; at most {MAX_INPUTS}.", param="input")
    engine = getattr(model.engine, "engine", model.engine)
    data, total = [], 0
    for i, it in enumerate(items):
        if isinstance(it, str):
            check_prompt_bytes(model, P.utf8_size(it, f"input[{i}]"), "input")
            ids = await asyncio.to_thread(model.tokenizer.encode, it)
        else:
            ids = list(it)
            if any(t < 0 or (model.vocab_size is not None and t >= model.vocab_size) for t in ids):
                raise bad_request(f"input[{i}] has a token id outside the vocabulary.", param="input")
        if not ids:
            raise bad_request(f"input[{i}] encodes to zero tokens.", param="input")
        if len(ids) > model.max_model_len:
            raise APIError(400, f"input[{i}] has {len(ids)} tokens; this model's context is {model.max_model_len}.",
                           param="input", code="context_length_exceeded")
        try:
            vec = await asyncio.to_thread(engine.embed, ids)
        except Exception as e:  # noqa: BLE001 - an adapter-served model cannot embed: say so
            raise bad_request(str(e), param="model") from None
        total += len(ids)
        emb: Any = vec if req.encoding_format == "float" else \
            base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model.name,
            "usage": {"prompt_tokens": total, "total_tokens": total}}


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text"):
                parts.append(str(p.get("text", "")))
            else:
                raise bad_request("only text content parts are supported in input.", param="input")
        return "".join(parts)
    return ""


def _chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        msgs.append({"role": "user", "content": req.input})
        return msgs
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            if role not in ("system", "developer", "user", "assistant"):
                raise bad_request(f"input[{i}].role {str(role)[:20]!r} is not supported.", param="input")
            msgs.append({"role": role, "content": _message_text(item.get("content"))})
        elif kind == "function_call":
            msgs.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}]})
        elif kind == "function_call_output":
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": str(item.get("output", ""))})
        else:
            raise bad_request(f"input[{i}] of type {str(kind)[:40]!r} is not supported.", param="input")
    return msgs


def _chat_body(req: ResponsesRequest) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body that answers this Responses request."""
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.get("type") != "function":
            raise bad_request(f"tools[{i}]: only function tools are supported.", param="tools")
        tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                          "strict") if k in t}})
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    body: dict[str, Any] = {"model": req.model, "messages": _chat_messages(req), "temperature": req.temperature,
                            "top_p": req.top_p, "max_tokens": req.max_output_tokens, "seed": req.seed,
                            "parallel_tool_calls": req.parallel_tool_calls}
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema", {}), "strict": fmt.get("strict")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    if tools:
        body["tools"], body["tool_choice"] = tools, choice
    if req.stream:
        body["stream"], body["stream_options"] = True, {"include_usage": True}
    return {k: v for k, v in body.items() if v is not None}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
            status == "completed" else []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _response_obj(req: ResponsesRequest, rid: str, created: int, model_name: str | None, status: str,
                  items: list[dict[str, Any]], use: dict[str, Any] | None) -> dict[str, Any]:
    """A ``response`` object (``status``: in_progress / completed / incomplete; ``use``: the chat usage)."""
    u = use or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}}
    return {
        "id": rid, "object": "response", "created_at": created, "model": model_name, "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None, "error": None,
        "instructions": req.instructions, "metadata": req.metadata or {}, "output": items,
        "parallel_tool_calls": req.parallel_tool_calls, "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [], "temperature": req.temperature, "top_p": req.top_p,
        "max_output_tokens": req.max_output_tokens, "text": req.text or {"format": {"type": "text"}},
        "usage": None if use is None else {
            "input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"],
            "input_tokens_details": {"cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": 0}},
    }


async def create_response(model: ServedModel, req: ResponsesRequest):
    from lmstack.serve.api.chat import create_chat_completion

    if req.previous_response_id:
        raise bad_request("previous_response_id is not supported: this server stores no responses.",
                          param="previous_response_id")
    chat = P.ChatCompletionRequest(**_chat_body(req))
    resp = await create_chat_completion(model, chat)
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return StreamingResponse(_events(req, rid, created, model.name, resp.body_iterator),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    out = json.loads(resp.body)
    c = out["choices"][0]
    items: list[dict[str, Any]] = []
    msg = c["message"]
    if msg.get("content"):
        items.append(_message_item(f"msg_{uuid.uuid4().hex}", msg["content"]))
    for call in msg.get("tool_calls") or []:
        items.append(_call_item(f"fc_{uuid.uuid4().hex}", call["id"], call["function"]["name"],
                                call["function"]["arguments"]))
    status = "incomplete" if c["finish_reason"] == "length" else "completed"
    return _response_obj(req, rid, created, model.name, status, items, out["usage"])


def _event(kind: str, seq: int, **fields: Any) -> str:
    """One Responses API server-sent event: ``event: <type>`` and the event as JSON."""
    body = json.dumps({"type": kind, "sequence_number": seq, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {body}\n\n"


async def _events(req: ResponsesRequest, rid: str, created: int, model_name: str | None,
                  chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
    """The chat route's ``chat.completion.chunk`` events as the Responses API's stream."""
    seq = 0
    items: list[dict[str, Any]] = []  # finished output items, in order
    msg: dict[str, Any] | None = None  # the message being streamed: {"id", "index", "text"}
    calls: dict[int, dict[str, Any]] = {}  # tool-call index -> {"item", "index"}
    reason, use = None, None

    def ev(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return _event(kind, seq - 1, **fields)

    def close_message() -> list[str]:
        nonlocal msg
        if msg is None:
            return []
        item = _message_item(msg["id"], msg["text"])
        part = item["content"][0]
        out = [ev("response.output_text.done", item_id=msg["id"], output_index=msg["index"], content_index=0,
                  text=msg["text"], logprobs=[]),
               ev("response.content_part.done", item_id=msg["id"], output_index=msg["index"], content_index=0,
                  part=part),
               ev("response.output_item.done", output_index=msg["index"], item=item)]
        items.append(item)
        msg = None
        return out

    yield ev("response.created", response=_response_obj(req, rid, created, model_name, "in_progress", [], None))
    yield ev("response.in_progress", response=_response_obj(req, rid, created, model_name, "in_progress", [], None))
    try:
        async for raw in chunks:
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            for line in text.split("\n"):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:  # the chat route's mid-stream failure
                    err = obj["error"] or {}
                    yield ev("error", code=err.get("code"), message=str(err.get("message", "")),
                             param=err.get("param"))
                    return
                if obj.get("usage"):
                    use = obj["usage"]
                for ch in obj.get("choices") or []:
                    delta = ch.get("delta") or {}
                    if delta.get("content"):
                        if msg is None:
                            msg = {"id": f"msg_{uuid.uuid4().hex}", "index": len(items), "text": ""}
                            yield ev("response.output_item.added", output_index=msg["index"],
                                     item=_message_item(msg["id"], "", "in_progress"))
                            yield ev("response.content_part.added", item_id=msg["id"], output_index=msg["index"],
                                     content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                        msg["text"] += delta["content"]
                        yield ev("response.output_text.delta", item_id=msg["id"], output_index=msg["index"],
                                 content_index=0, delta=delta["content"], logprobs=[])
                    for tc in delta.get("tool_calls") or []:
                        for e in close_message():
                            yield e
                        i = tc.get("index", 0)
                        fn = tc.get("function") or {}
                        if i not in calls:
                            item = _call_item(f"fc_{uuid.uuid4().hex}", tc.get("id") or f"call_{uuid.uuid4().hex}",
                                              fn.get("name") or "", "", "in_progress")
                            calls[i] = {"item": item, "index": len(items) + len(calls)}
                            yield ev("response.output_item.added", output_index=calls[i]["index"], item=dict(item))
                        if fn.get("arguments"):
                            c = calls[i]
                            c["item"]["arguments"] += fn["arguments"]
                            yield ev("response.function_call_arguments.delta", item_id=c["item"]["id"],
                                     output_index=c["index"], delta=fn["arguments"])
                    if ch.get("finish_reason"):
                        reason = ch["finish_reason"]
    except Exception as e:  # noqa: BLE001 - a failure mid-stream: one error event
        yield ev("error", code=None, message=str(e) or type(e).__name__, param=None)
        return
    finally:  # a client that went away: close the chat stream now, which aborts the engine request
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    for e in close_message():
        yield e
    for i in sorted(calls):
        c = calls[i]
        item = {**c["item"], "status": "completed"}
        yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=c["index"],
                 arguments=item["arguments"])
        yield ev("response.output_item.done", output_index=c["index"], item=item)
        items.append(item)
    status = "incomplete" if reason == "length" else "completed"
    final = _response_obj(req, rid, created, model_name, status, items, use)
    yield ev("response.incomplete" if status == "incomplete" else "response.completed", response=final)
