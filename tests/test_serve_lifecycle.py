"""Admission and shutdown: 429 when the queue is full, 503 while draining, SIGTERM on `lmstack serve`."""

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
        self.started = threading.Event()
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


def test_queue_full_is_429(model_dir):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    app = create_app(L.load(model_dir, max_num_seqs=1), served_model_name="m", max_waiting=1)
    with LiveServer(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        running = Streamer(s.url, 230)
        running.start()
        running.started.wait(30)
        waiting = Streamer(s.url, 230)
        waiting.start()
        wait_for(lambda: engine_stat(s.url, "lmstack_num_requests_waiting") == 1, what="a waiting request")
        with pytest.raises(openai.RateLimitError) as ei:
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=2)
        assert ei.value.response.headers["retry-after"] == "1"
        assert ei.value.body["code"] == "rate_limit_exceeded"
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

    app = create_app(L.load(model_dir), served_model_name="m")
    server = LiveServer(app).__enter__()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        inflight = Streamer(server.url, 60)
        inflight.start()
        inflight.started.wait(30)
        server.begin_drain()
        wait_for(lambda: httpx.get(server.url + "/health").status_code == 503, what="health 503")
        with pytest.raises(openai.InternalServerError) as ei:
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "shutting_down"
        inflight.join(60)
        assert inflight.error is None and (inflight.finish_reason, inflight.usage) == ("length", 60)
        server.thread.join(30)  # drained: the server exits by itself
        assert not server.thread.is_alive()
    finally:
        server.stop()


def test_sigterm_drains_lmstack_serve(model_dir):
    """The real CLI in a subprocess: SIGTERM lets the in-flight stream finish, new requests get 503, exit 0."""
    port, key = free_port(), "sk-cli"
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "LMSTACK_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", "--model", str(model_dir), "--port",
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
        inflight.started.wait(30)
        proc.send_signal(signal.SIGTERM)
        body = {"model": "m", "messages": MSGS, "max_tokens": 2}
        statuses: list = []

        def refused() -> bool:
            try:
                r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
                statuses.append(r.status_code)
            except httpx.TransportError as e:  # recorded: the server must still listen while draining
                statuses.append(type(e).__name__)
            return statuses[-1] == 503

        try:
            wait_for(refused, timeout=10, what="503 while draining")
        except AssertionError:
            raise AssertionError(f"no 503 while draining; got {statuses}") from None
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
