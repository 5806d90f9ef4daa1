"""Admission and shutdown: 429 when the queue is full, 503 while draining, SIGTERM on `lmstack serve`.

None of these tests may depend on how fast the machine is: a request that must still be in flight while the
test checks something is held there by a gate on the engine's forward pass (``hold_engine``, or the file gate
of ``GATED_CLI`` for the real CLI in a subprocess), opened by the test once it has checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from tests.serve_fixtures import LiveServer, free_port, shared_model_dir

torch.set_num_threads(2)
MSGS = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_dir():
    return shared_model_dir()


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def hold_engine(llm, after_steps: int = 3) -> threading.Event:
    """From its ``after_steps``-th forward pass on, the engine thread waits until the returned event is set: the
    requests it runs stay in flight however busy the machine is (the first passes run, so they are admitted)."""
    runner = llm.engine.runner
    run, calls = runner.run, [0]

    def gated(batch):
        calls[0] += 1
        if calls[0] >= after_steps:
            assert release.wait(120), "the test never opened the engine gate"
        return run(batch)

    release = threading.Event()
    runner.run = gated
    return release


# `lmstack serve` (the real CLI) with the same gate on ModelRunner.run, opened by creating the file $LMSTACK_TEST_GATE
GATED_CLI = """
import os, sys, time
from lmstack.serve.runner import ModelRunner
run, calls, gate = ModelRunner.run, [0], os.environ["LMSTACK_TEST_GATE"]
def gated(self, batch):
    calls[0] += 1
    deadline = time.time() + 120
    while calls[0] >= 3 and not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.01)
    return run(self, batch)
ModelRunner.run = gated
from lmstack.cli import main
sys.exit(main(sys.argv[1:]))
"""


def engine_stat(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


class Streamer(threading.Thread):
    """A streaming completion in a thread; records its first-chunk time, text and finish reason."""

    def __init__(self, url: str, max_tokens: int, headers: dict | None = None):
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.headers = url, max_tokens, headers or {}
        self.started = threading.Event()  # the first event arrived
        self.admitted = threading.Event()  # answered 200: the engine took the request (or it failed: see error)
        self.cancel = threading.Event()  # set it to close the stream early (a client going away)
        self.finish_reason: str | None = None
        self.usage: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        import json

        try:
            body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": self.max_tokens, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", self.url + "/v1/completions", json=body, headers=self.headers,
                              timeout=60) as resp:
                assert resp.status_code == 200, resp.read()
                self.admitted.set()
                for line in resp.iter_lines():
                    if self.cancel.is_set():
                        return
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    self.started.set()
                    for c in ev.get("choices", []):
                        self.finish_reason = c.get("finish_reason") or self.finish_reason
                    if ev.get("usage"):
                        self.usage = ev["usage"]["completion_tokens"]
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.started.set()
            self.admitted.set()


def test_queue_full_is_429(model_dir):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    llm = L.load(model_dir, max_num_seqs=1)
    release = hold_engine(llm)  # the running request cannot finish (and free the seat) before the 429 is seen
    app = create_app(llm, served_model_name="m", max_waiting=1)
    with LiveServer(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        running = Streamer(s.url, 230)
        running.start()
        assert running.admitted.wait(60) and running.error is None
        waiting = Streamer(s.url, 230)
        waiting.start()
        wait_for(lambda: engine_stat(s.url, "lmstack_num_requests_waiting") == 1, timeout=60, what="a waiting request")
        with pytest.raises(openai.RateLimitError) as ei:  # answered while the engine is held mid-step: a refused
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=2)  # request waits on no step
        assert ei.value.response.headers["retry-after"] == "1"
        assert ei.value.body["code"] == "rate_limit_exceeded"
        release.set()
        for st in (running, waiting):
            st.cancel.set()
            st.join(60)
            assert st.error is None
        wait_for(lambda: engine_stat(s.url, "lmstack_num_requests_running") == 0
                 and engine_stat(s.url, "lmstack_num_requests_waiting") == 0, what="the queue to empty")
        assert engine_stat(s.url, "lmstack_kv_cache_blocks_used") == 0
        # the queue drained: the same request is admitted now
        assert client.chat.completions.create(model="m", messages=MSGS, max_tokens=2).choices


def test_drain_finishes_in_flight_and_refuses_new(model_dir):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    llm = L.load(model_dir)
    release = hold_engine(llm)  # the in-flight stream cannot finish (and the server exit) before the 503 is seen
    app = create_app(llm, served_model_name="m")
    server = LiveServer(app).__enter__()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        inflight = Streamer(server.url, 60)
        inflight.start()
        assert inflight.admitted.wait(60) and inflight.error is None
        server.begin_drain()
        wait_for(lambda: httpx.get(server.url + "/health").status_code == 503, timeout=60, what="health 503")
        with pytest.raises(openai.InternalServerError) as ei:
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "shutting_down"
        assert server.thread.is_alive()  # still draining: the held request is in flight
        release.set()
        inflight.join(60)
        assert inflight.error is None and (inflight.finish_reason, inflight.usage) == ("length", 60)
        server.thread.join(30)  # drained: the server exits by itself
        assert not server.thread.is_alive()
    finally:
        server.stop()


def test_sigterm_drains_lmstack_serve(model_dir, tmp_path):
    """The real CLI in a subprocess: SIGTERM lets the in-flight stream finish, new requests get 503, exit 0."""
    port, key = free_port(), "sk-cli"
    url = f"http://127.0.0.1:{port}"
    gate = tmp_path / "open"  # the in-flight stream is held after its first forward passes until this file exists
    env = {**os.environ, "OMP_NUM_THREADS": "2", "LMSTACK_NO_PROGRESS": "1", "LMSTACK_TEST_GATE": str(gate)}
    proc = subprocess.Popen([sys.executable, "-c", GATED_CLI, "serve", "--model", str(model_dir), "--port",
                             str(port), "--api-key", key, "--served-model-name", "m", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60, what="lmstack serve to start")
        auth = {"Authorization": f"Bearer {key}"}
        inflight = Streamer(url, 120, auth)
        inflight.start()
        assert inflight.admitted.wait(60) and inflight.error is None
        proc.send_signal(signal.SIGTERM)
        # the signal is handled asynchronously: /health says when the server drains (it answers without the engine)
        wait_for(lambda: httpx.get(url + "/health", timeout=10).status_code == 503, timeout=60, what="health 503")
        body = {"model": "m", "messages": MSGS, "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert proc.poll() is None  # still draining: the held request is in flight
        gate.touch()
        inflight.join(60)
        assert inflight.error is None and (inflight.finish_reason, inflight.usage) == ("length", 120)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_busy_port_is_a_one_line_error(model_dir, capsys):
    import socket

    from lmstack.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack: cannot listen on 127.0.0.1:") and "--port" in err and "\n" not in err


def test_cors_preflight_only_for_allowed_origins(model_dir):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    app = create_app(L.load(model_dir), api_key="k", served_model_name="m", allowed_origins=["http://app.local"])
    with LiveServer(app) as s:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        ok = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://app.local", **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.local"
        bad = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://evil.local", **pre})
        assert "access-control-allow-origin" not in bad.headers
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "m", "messages": MSGS, "max_tokens": 2},
                       headers={"Origin": "http://app.local", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.local"
