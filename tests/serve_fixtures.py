"""Fixtures for the HTTP-server and web-chat tests: a tiny model directory and a live uvicorn server.

``tiny_model_dir(path)`` trains a ~320-token byte-level BPE (lmstack.tokenizer, ChatML template) and saves a
2-layer, 64-wide random Qwen2 from ``transformers`` beside it. ``LiveServer`` runs the app with uvicorn on
127.0.0.1 and a free port in a background thread (the same ``DrainingServer`` that ``lmstack serve`` runs).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "Language models predict the next token given the previous tokens.",
    "Serving many requests at once needs continuous batching and a paged KV cache.",
    "def add(a, b):\n    return a + b\n",
    "# Title\n\n- one\n- two\n\n**bold** and *italic* text.",
] * 20


def tiny_model_dir(path: str | Path, seed: int = 0, max_position_embeddings: int = 256) -> Path:
    """A tokenizer + random 2-layer qwen2 model directory that both lmstack and transformers load."""
    from lmstack.tokenizer import train_tokenizer
    from tests.conftest import make_hf_model

    path = Path(path)
    tok = train_tokenizer(CORPUS, vocab_size=320, out_dir=path, show_progress=False)
    eos = tok.token_to_id("<|im_end|>")
    make_hf_model("qwen2", path, seed=seed, vocab_size=tok.vocab_size, eos_token_id=eos,
                  bos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"),
                  max_position_embeddings=max_position_embeddings, initializer_range=0.2)
    return path


_SHARED: dict[str, Path] = {}


def shared_model_dir() -> Path:
    """One tiny model directory per test process (the server, lifecycle and web-chat tests share it)."""
    if "dir" not in _SHARED:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="lmstack_serve_"))
        atexit.register(shutil.rmtree, root, True)
        _SHARED["dir"] = tiny_model_dir(root / "tiny")
    return _SHARED["dir"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on 127.0.0.1:<free port>; ``url`` is the base URL, ``stop()`` drains and exits."""

    def __init__(self, app, drain_timeout: float = 30.0):
        from lmstack.serve.api import build_server

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(app, port=self.port, log_level="warning", drain_timeout=drain_timeout)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def begin_drain(self) -> None:
        """What SIGTERM does, without a signal (signals only reach the main thread)."""
        loop = self.server._loop
        assert loop is not None
        loop.call_soon_threadsafe(self.server.begin_drain)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __exit__(self, *exc) -> None:
        self.stop()


def run_coro(coro):
    return asyncio.run(coro)


class RecordingRetriever:
    """A retriever for the support server's tests: records every search and returns ``hits`` (the server's real
    code path runs on them)."""

    def __init__(self, hits=()):
        self.hits, self.calls = list(hits), []
        self.lock = threading.Lock()

    def search(self, question, k=5, lang=None):
        with self.lock:
            self.calls.append(question)
        return list(self.hits)

    def __len__(self):
        return len(self.hits)
