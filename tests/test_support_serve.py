"""`lmstack support serve` as a real process on 127.0.0.1, driven by the `openai` client: every chat request is
grounded in the index and answered by the ranker, exactly as the in-process assistant answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.serve_fixtures import free_port, shared_model_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lmstack.apps.support import load_kb
    from lmstack.apps.support.retrieval import build_kb_index
    from lmstack.rag.rerank import LinearRanker

    root = tmp_path_factory.mktemp("support_serve")
    index = root / "index.sqlite"
    build_kb_index(load_kb(), index, faq_keywords=True)
    ranker = root / "ranker.json"
    LinearRanker({"lm": 0.5, "overlap": 4.0, "rank2": -1.0, "rank3": -2.0, "reply": -1.0}).save(ranker)
    model = shared_model_dir()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "LMSTACK_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "support", "serve", "--model", str(model),
                             "--index", str(index), "--ranker", str(ranker), "--port", str(port),
                             "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"lmstack support serve exited ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("lmstack support serve did not come up within 90 s")
        time.sleep(0.1)
    yield url, model, index, ranker
    proc.terminate()
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_openai_client_gets_the_assistants_ranked_answer(served):
    from lmstack.apps.support.assistant import SupportAssistant
    from lmstack.apps.support.reader import answer_units

    url, model, index, ranker = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    name = client.models.list().data[0].id
    bot = SupportAssistant(model, index=index, ranker=ranker, device="cpu", max_num_seqs=1)
    for question in ("What does the Cedar Cutting Board weigh?", "退货运费谁出？"):
        bot.reset()
        expected = bot.ask(question)
        # a sentence of the passages the question retrieves (or a fixed reply), ranked by the same weights
        assert expected in {u for h in bot.last_context for u in answer_units(h.chunk)} | {
            c.text for c, _ in bot.reader.ranked("", question, []) if c.rank == 0}
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}])
        assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
        if question.startswith("What does"):  # the overlap weight decides: the server used the ranker file
            assert expected == "The Cedar Cutting Board weighs 1.2 kg."
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == expected
