"""`lmstack support serve` against hostile clients, live on 127.0.0.1 (issue 18, "Hostile clients").

The grounding middleware must authenticate before it reads a body, cap every body while reading it (a chunked
body has no length to check up front), and do no retrieval for a request the server refuses. The raw-socket
requests below send a body that never ends: a server that waits for the end before answering never answers,
so the test fails on its socket timeout; one that refuses at once answers whatever the machine's load.
"""

from __future__ import annotations

import json
import socket
import threading

import openai
import pytest
import torch

from tests.serve_fixtures import LiveServer, shared_model_dir

torch.set_num_threads(2)
KEY = "sk-support-key"
LIMIT = 64 * 1024


class RecordingRetriever:
    """A retriever that records every search and returns ``hits`` (the server's real code path runs on them)."""

    def __init__(self, hits=()):
        self.hits, self.calls = list(hits), []
        self.lock = threading.Lock()

    def search(self, question, k=5, lang=None):
        with self.lock:
            self.calls.append(question)
        return list(self.hits)

    def __len__(self):
        return len(self.hits)


@pytest.fixture(scope="module")
def llm():
    import lmstack.serve.llm as L

    return L.load(shared_model_dir(), max_num_seqs=8)


@pytest.fixture(scope="module")
def support(llm):
    from lmstack.apps.support.server import create_support_app

    retriever = RecordingRetriever()
    app = create_support_app(llm, retriever, api_key=KEY, served_model_name="tiny", max_request_bytes=LIMIT)
    with LiveServer(app) as s:
        s.retriever = retriever
        yield s


def raw_chunked(port: int, headers: dict[str, str], chunks: list[bytes], timeout: float = 60.0):
    """POST /v1/chat/completions with ``Transfer-Encoding: chunked``, the ``chunks`` and NO final chunk (the body
    never ends); returns (status, JSON body) of the response."""
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", "Content-Type": "application/json",
                                                  "Transfer-Encoding": "chunked", **headers}.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode())
        for c in chunks:
            s.sendall(f"{len(c):x}\r\n".encode() + c + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            got = s.recv(65536)
            assert got, f"connection closed before a response: {data!r}"
            data += got
        head_raw, body = data.split(b"\r\n\r\n", 1)
        lines = head_raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(hdrs["content-length"])
        while len(body) < length:
            got = s.recv(65536)
            assert got, "connection closed inside the response body"
            body += got
    return status, json.loads(body[:length])


def big_chat_chunks(total: int, size: int = 16 * 1024) -> list[bytes]:
    start = b'{"model": "tiny", "messages": [{"role": "user", "content": "'
    out, n = [start], len(start)
    while n < total:
        out.append(b"a" * size)
        n += size
    return out


def test_unauthenticated_chunked_body_is_refused_unread_and_never_retrieved(support):
    # sanity: an authenticated request is grounded (the recording retriever is the one the server calls)
    client = openai.OpenAI(base_url=support.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length") and support.retriever.calls == ["Hi"]
    support.retriever.calls.clear()

    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        status, body = raw_chunked(support.port, headers, big_chat_chunks(32 * 1024))
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=support.url + "/v1", api_key="nope", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Where is my order?"}])
    assert support.retriever.calls == []


def test_authenticated_chunked_body_over_the_limit_is_413_while_streaming(support):
    support.retriever.calls.clear()
    status, body = raw_chunked(support.port, {"Authorization": f"Bearer {KEY}"}, big_chat_chunks(LIMIT + 20_000))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert str(LIMIT) in body["error"]["message"]
    assert support.retriever.calls == []
    # a declared length over the limit: 413 before reading, from the server's own gate
    client = openai.OpenAI(base_url=support.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * (LIMIT + 1)}])
    assert e.value.status_code == 413 and support.retriever.calls == []
