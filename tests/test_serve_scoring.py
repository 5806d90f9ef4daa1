"""Prompt log-probs (``echo`` + ``logprobs``), ``/v1/embeddings`` and ``/v1/responses`` on a live server, each with
the client that uses it: lm-evaluation-harness's ``local-completions`` model gives the same multiple-choice
accuracy as ``lmstack eval``; the ``openai`` client's ``embeddings`` and ``responses``. Numbers are checked against
``transformers`` on the same weights.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

from tests.eval_fixtures import make_model_dir, one_thread
from tests.serve_fixtures import LiveServer

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("scoring") / "model", seed=3)


@pytest.fixture(scope="module")
def server(model_dir):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    with LiveServer(create_app(L.load(model_dir, max_num_seqs=16), served_model_name="tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def test_echo_prompt_logprobs_match_transformers(client, hf):
    ids = [5, 9, 14, 3, 27, 8, 11]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, logprobs=2, echo=True, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # the generated token's log-prob follows the prompt's, and offsets run through the echoed text
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and r.choices[0].text.startswith("".join(lp.tokens[:len(ids)]))


def test_lm_eval_local_completions_equals_lmstack_eval(server, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmstack.eval.lmeval_task import export_lm_eval_task
    from lmstack.eval.run import run_eval
    from lmstack.eval.task import load_task

    names = {}
    # the shipped 0-shot multiple-choice tasks (export_lm_eval_task writes 0-shot tasks; mc_en_3shot stays lmstack's)
    for spec in ("mc_en", "mc_en_text", "mc_zh"):
        t = load_task(spec)
        t.limit = 6  # 6 questions x 4 choices x 3 tasks: 72 scoring requests, one at a time
        names[spec] = export_lm_eval_task(t, tmp_path / "tasks")
    ours = run_eval(model_dir, list(names), limit=6, show_progress=False)["tasks"]
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={server.url}/v1/completions,tokenizer={model_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
        tasks=list(names.values()), task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        batch_size=1, log_samples=False)["results"]
    for spec, name in names.items():
        assert res[name]["acc,none"] == pytest.approx(ours[spec]["metrics"]["acc"]), spec
        assert res[name]["acc_norm,none"] == pytest.approx(ours[spec]["metrics"]["acc_norm"]), spec


def test_embeddings_are_mean_pooled_hidden_states(client, hf, model_dir):
    from lmstack.tokenizer import Tokenizer

    texts = ["the quick brown fox", "hello"]
    r = client.embeddings.create(model="tiny", input=texts)  # the openai client asks for base64 and decodes it
    tok = Tokenizer.from_dir(model_dir)
    for d, text in zip(r.data, texts):
        ids = tok.encode(text)
        with torch.no_grad():
            h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        torch.testing.assert_close(torch.tensor(d.embedding), h, atol=1e-4, rtol=1e-4)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    f = client.embeddings.create(model="tiny", input=[[5, 6, 7]], encoding_format="float")
    assert len(f.data[0].embedding) == hf.config.hidden_size
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input=["x"] * 300)


def test_responses_api_text_json_and_tools(client):
    r = client.responses.create(model="tiny", input="Say something.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 5
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model="tiny", instructions="JSON only.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Are you ok?"}]}], max_output_tokens=50,
        text={"format": {"type": "json_schema", "name": "ok", "schema": schema, "strict": True}})
    assert r.status == "completed" and isinstance(json.loads(r.output_text)["ok"], bool)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_1")
