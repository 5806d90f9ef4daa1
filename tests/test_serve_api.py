"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official ``openai`` client.

The engine is the real one (lmstack.serve.llm.load on a tiny random qwen2). Reference numbers come from
``transformers`` on the same weights: greedy continuations from ``generate``, log-probs from a forward pass.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from tests.serve_fixtures import LiveServer, shared_model_dir

torch.set_num_threads(2)
KEY = "sk-test-key"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there, fox!"}]


@pytest.fixture(scope="module")
def model_dir():
    return shared_model_dir()


@pytest.fixture(scope="module")
def server(model_dir):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    llm = L.load(model_dir, max_num_seqs=64)
    app = create_app(llm, api_key=KEY, served_model_name="tiny", max_request_bytes=64 * 1024)
    with LiveServer(app) as s:
        s.llm = llm
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(model_dir):
    import transformers

    from lmstack.tokenizer import Tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, Tokenizer.from_dir(model_dir)


def hf_greedy(hf, ids: list[int], n: int, **kw) -> list[int]:
    model, tok = hf
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def chat_ids(hf, msgs) -> list[int]:
    return list(hf[1].apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))


def metrics(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels
            or s.name.endswith(("_count", "_sum"))}


# ----------------------------------------------------------------------------------------------- chat
def test_models_health_and_ui(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and '"model": "tiny"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert httpx.get(server.url + "/ui/app.js").status_code == 200
    assert httpx.get(server.url + "/ui/__init__.py").status_code == 404


def test_chat_greedy_matches_transformers(client, hf):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    ref = hf_greedy(hf, chat_ids(hf, MSGS), 12)
    assert r.choices[0].message.content == hf[1].decode(ref, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(chat_ids(hf, MSGS)) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_stream_shape_and_text(client, server):
    full = client.chat.completions.create(model="tiny", messages=MSGS, max_completion_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_completion_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    # the raw wire format ends with the [DONE] sentinel
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": MSGS, "max_tokens": 3, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_chat_logprobs_match_forward_pass(client, hf):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    model, tok = hf
    prompt = chat_ids(hf, MSGS)
    gen = hf_greedy(hf, prompt, 5)
    with torch.no_grad():
        lp = model(torch.tensor([prompt + gen])).logits[0].log_softmax(-1)  # (T, V)
    for j, entry in enumerate(content):
        row = lp[len(prompt) - 1 + j]
        assert entry.logprob == pytest.approx(float(row[gen[j]]), abs=1e-3)
        assert entry.token == tok.decode([gen[j]])
        top_v, top_i = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in top_i.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_v.tolist(), abs=1e-3)


def test_n2_seed_determinism_and_stop(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(n=2, seed=1234, **kw)
    b = client.chat.completions.create(n=2, seed=1234, **kw)
    c = client.chat.completions.create(n=2, seed=999, **kw)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert texts(a)[0] != texts(a)[1]  # the two completions sample independently
    assert a.usage.completion_tokens == 32
    # stop: cut the seeded text at a substring from its middle
    text = texts(a)[0]
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    stop = text[start:start + 2]
    s = client.chat.completions.create(n=1, seed=1234, stop=[stop], **kw)
    assert s.choices[0].message.content == text[:start]
    assert s.choices[0].finish_reason == "stop"


def test_extra_body_sampling_params(client, hf):
    greedy = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
    topk1 = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=1.5,
                                           extra_body={"top_k": 1, "ignore_eos": True}).choices[0].message.content
    minp1 = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=1.5,
                                           extra_body={"min_p": 1.0, "ignore_eos": True}).choices[0].message.content
    assert topk1 == greedy and minp1 == greedy
    rep = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0,
                                         extra_body={"repetition_penalty": 1.5, "ignore_eos": True})
    ref = hf_greedy(hf, chat_ids(hf, MSGS), 10, repetition_penalty=1.5)
    assert rep.choices[0].message.content == hf[1].decode(ref, skip_special_tokens=True)
    assert ref != hf_greedy(hf, chat_ids(hf, MSGS), 10)  # the penalty changes the text here


def test_presence_frequency_penalty_formula(client, hf):
    """OpenAI's published formula: logit -= frequency * count + presence * (count > 0), greedy."""
    model, tok = hf
    prompt = chat_ids(hf, MSGS)
    ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([ids])).logits[0, -1] - 0.7 * counts - 1.3 * (counts > 0).float()
            t = int(logits.argmax())
            ids.append(t)
            counts[t] += 1
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0,
                                       frequency_penalty=0.7, presence_penalty=1.3, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tok.decode(ids[len(prompt):], skip_special_tokens=True)
    assert ids[len(prompt):] != hf_greedy(hf, prompt, 10)  # the penalties change the text here


# ------------------------------------------------------------------------------------------ completions
def test_completions_batch_echo_and_stream(client, hf):
    model, tok = hf
    r = client.completions.create(model="tiny", prompt=["The quick", "Hello world"], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.object == "text_completion"
    for c, p in zip(r.choices, ["The quick", "Hello world"]):
        assert c.text == tok.decode(hf_greedy(hf, tok.encode(p), 6), skip_special_tokens=True)
    assert r.usage.completion_tokens == 12
    e = client.completions.create(model="tiny", prompt="The quick", max_tokens=6, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert e.choices[0].text == "The quick" + r.choices[0].text
    tokens = client.completions.create(model="tiny", prompt=tok.encode("The quick"), max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert tokens.choices[0].text == r.choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=["The quick", "Hello world"], max_tokens=6,
                                            temperature=0, n=2, stream=True, extra_body={"ignore_eos": True}))
    by_index: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] = by_index.get(c.index, "") + c.text
    assert by_index == {0: r.choices[0].text, 1: r.choices[0].text, 2: r.choices[1].text, 3: r.choices[1].text}


def test_completions_logprobs_legacy_shape(client, hf):
    model, tok = hf
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    prompt = tok.encode("Hello world")
    gen = hf_greedy(hf, prompt, 4)
    with torch.no_grad():
        ref = model(torch.tensor([prompt + gen])).logits[0].log_softmax(-1)
    assert lp.tokens == [tok.decode([t]) for t in gen]
    assert lp.token_logprobs == pytest.approx([float(ref[len(prompt) - 1 + j, t]) for j, t in enumerate(gen)],
                                              abs=1e-3)
    for j, alts in enumerate(lp.top_logprobs):
        v, ix = ref[len(prompt) - 1 + j].topk(2)
        want: dict[str, float] = {}
        for i, x in zip(ix.tolist(), v.tolist()):  # texts can collide: the likelier token's value is kept
            want.setdefault(tok.decode([i]), x)
        assert alts.keys() == want.keys() and list(alts.values()) == pytest.approx(list(want.values()), abs=1e-3)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


# ----------------------------------------------------------------------------------------------- errors
def status_of(fn) -> tuple[int, str]:
    with pytest.raises(openai.APIStatusError) as ei:
        fn()
    return ei.value.status_code, json.dumps(ei.value.body)


def test_error_statuses(server, client):
    chat = client.chat.completions.create
    assert status_of(lambda: chat(model="nope", messages=MSGS))[0] == 404
    code, body = status_of(lambda: chat(model="tiny", messages=[{"role": "user", "content": "fox " * 400}]))
    assert code == 400 and "256" in body and "context length" in body
    code, body = status_of(lambda: chat(model="tiny", messages=MSGS, max_tokens=250))
    assert code == 400 and "256" in body
    assert status_of(lambda: chat(model="tiny", messages=MSGS, temperature=5))[0] == 400
    # logit_bias, tools and response_format are served (tests/test_structured_api.py); bad values are 400s
    code, body = status_of(lambda: chat(model="tiny", messages=MSGS, logit_bias={"99999": 10}))
    assert code == 400 and "logit_bias" in body and "vocabulary" in body
    tools = [{"type": "function", "function": {"parameters": {}}}]
    code, body = status_of(lambda: chat(model="tiny", messages=MSGS, tools=tools))
    assert code == 400 and "name" in body
    code, body = status_of(lambda: chat(model="tiny", messages=MSGS, response_format={"type": "xml"}))
    assert code == 400 and json.loads(body)["param"] == "response_format"
    # OpenAI's own limits (n, temperature, 16 stops), then SamplingParams' ranges, each answered with its field
    for kw, param in [(dict(n=0), "n"), (dict(n=129), "n"), (dict(temperature=2.5), "temperature"),
                      (dict(top_logprobs=2), "top_logprobs"), (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
                      (dict(stop=["x"] * 17), "stop"), (dict(stop=["ok", ""]), "stop"),
                      (dict(extra_body={"top_k": -5}), "top_k"), (dict(max_tokens=0), "max_tokens"),
                      (dict(presence_penalty=3), "presence_penalty"), (dict(top_p=0), "top_p"),
                      (dict(extra_body={"min_p": 1.5}), "min_p"), (dict(extra_body={"min_tokens": -1}), "min_tokens"),
                      (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty")]:
        code, body = status_of(lambda: chat(model="tiny", messages=MSGS, **kw))
        assert code == 400 and json.loads(body)["param"] == param, (kw, body)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    assert status_of(lambda: chat(model="tiny", messages=image))[0] == 400
    assert status_of(lambda: chat(model="tiny", messages=[]))[0] == 400
    comp = client.completions.create
    code, body = status_of(lambda: comp(model="tiny", prompt=[5, 99999], max_tokens=2))
    assert code == 400 and "99999" in body and "320" in body
    # echo + logprobs gives prompt log-probs (tests/test_serve_scoring.py): the first prompt token's is null
    echoed = comp(model="tiny", prompt="x y", echo=True, logprobs=1, max_tokens=1)
    assert echoed.choices[0].logprobs.token_logprobs[0] is None
    code, body = status_of(lambda: comp(model="tiny", prompt="x", logprobs=6))
    assert code == 400 and json.loads(body)["param"] == "logprobs"
    code, body = status_of(lambda: comp(model="tiny", prompt="x", frequency_penalty=-2.5))
    assert code == 400 and json.loads(body)["param"] == "frequency_penalty"
    assert status_of(lambda: comp(model="tiny", prompt="x", suffix="y"))[0] == 400
    assert status_of(lambda: comp(model="tiny", prompt="fox " * 300))[0] == 400
    # harmless unknown parameters are ignored
    ok = chat(model="tiny", messages=MSGS, max_tokens=2, user="u1", extra_body={"frobnicate": 1})
    assert ok.usage.completion_tokens <= 2
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    assert status_of(lambda: bad_key.chat.completions.create(model="tiny", messages=MSGS))[0] == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(server.url + "/v1/chat/completions", headers=auth,
                     json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    missing = httpx.post(server.url + "/v1/chat/completions", headers=auth, json={"model": "tiny"})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "messages"
    garbage = httpx.post(server.url + "/v1/completions", headers={**auth, "Content-Type": "application/json"},
                         content=b"{not json")
    assert garbage.status_code == 422 and "error" in garbage.json()


# ------------------------------------------------------------------------------------- load and abort
def test_64_concurrent_streams_then_no_kv_blocks_in_use(server):
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i: int) -> tuple[str, int]:
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8, stream=True,
            temperature=0.8, seed=i, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        reason, n = None, 0
        async for ch in stream:
            if ch.choices and ch.choices[0].finish_reason:
                reason = ch.choices[0].finish_reason
            if ch.usage:
                n = ch.usage.completion_tokens
        return reason, n

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    before = metrics(server).get("lmstack_time_to_first_token_seconds_count", 0)
    results = asyncio.run(main())
    assert results == [("length", 8)] * 64
    m = metrics(server)
    assert m["lmstack_kv_cache_blocks_used"] == 0 and m["lmstack_num_requests_running"] == 0
    assert m["lmstack_num_requests_waiting"] == 0 and m["lmstack_kv_cache_blocks_total"] > 0
    assert m["lmstack_time_to_first_token_seconds_count"] - before == 64
    assert m["lmstack_inter_token_latency_seconds_count"] > 0 and m["lmstack_e2e_request_latency_seconds_count"] >= 64
    assert m["lmstack_generation_tokens_total"] >= 64 * 8 and m["lmstack_prompt_tokens_total"] > 0
    assert "lmstack_prefix_cache_hit_rate" in m


def test_client_disconnect_aborts_request(server):
    import time

    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 200, "stream": True,
                            "ignore_eos": True}, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines), next(lines)
        assert metrics(server)["lmstack_num_requests_running"] == 1
    deadline = time.time() + 10
    while metrics(server)["lmstack_num_requests_running"] != 0 and time.time() < deadline:
        time.sleep(0.05)
    m = metrics(server)
    assert m["lmstack_num_requests_running"] == 0 and m["lmstack_kv_cache_blocks_used"] == 0


def test_non_streaming_client_that_gives_up_aborts_request(server, monkeypatch):
    import time

    # 200 tokens of this 2-layer model take well under the client's 0.25 s with the compiled decode kernel:
    # slow each engine step down (5 ms) so the client really gives up mid-generation
    runner = server.llm.engine.runner
    run = runner.run

    def slow_run(batch):
        time.sleep(0.005)
        return run(batch)

    monkeypatch.setattr(runner, "run", slow_run)
    before = metrics(server)["lmstack_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": MSGS, "max_tokens": 200, "ignore_eos": True}, timeout=0.25)
    deadline = time.time() + 10
    while metrics(server)["lmstack_num_requests_running"] != 0 and time.time() < deadline:
        time.sleep(0.05)
    m = metrics(server)
    assert m["lmstack_num_requests_running"] == 0 and m["lmstack_kv_cache_blocks_used"] == 0
    assert m["lmstack_generation_tokens_total"] - before < 200  # stopped early, not run to max_tokens
    text = httpx.get(server.url + "/metrics").text
    assert 'lmstack_http_requests_total{route="/v1/chat/completions",status="499"} 1.0' in text


def test_hf_reference_engine_behind_the_same_api(model_dir, client):
    """The benchmark's baseline (benchmarks/hf_engine.py: transformers generate, one at a time) answers like the
    lmstack engine behind the same API."""
    from benchmarks.hf_engine import HFEngine
    from lmstack.serve.api import create_app

    kw = dict(model="tiny", messages=MSGS, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    want = client.chat.completions.create(**kw).choices[0].message.content
    with LiveServer(create_app(HFEngine(model_dir), served_model_name="tiny")) as s:
        base = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = base.chat.completions.create(**kw)
        assert r.choices[0].message.content == want and r.usage.completion_tokens == 8
        streamed = "".join(c.choices[0].delta.content or "" for c in base.chat.completions.create(stream=True, **kw)
                           if c.choices)
        assert streamed == want
        comp = base.completions.create(model="tiny", prompt=["The quick", "Hello"], max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
        assert [c.index for c in comp.choices] == [0, 1] and comp.usage.completion_tokens == 8


def test_chat_stream_n2_with_logprobs_matches_non_stream(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=6, temperature=1.0, seed=7, n=2, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    text: dict[int, str] = {0: "", 1: ""}
    lps: dict[int, list] = {0: [], 1: []}
    roles, reasons = [], {}
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            if c.delta.role:
                roles.append(c.index)
            text[c.index] += c.delta.content or ""
            if c.logprobs is not None:
                lps[c.index] += [(t.token, round(t.logprob, 4), len(t.top_logprobs)) for t in c.logprobs.content]
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert sorted(roles) == [0, 1] and reasons == {0: "length", 1: "length"}
    for ch in full.choices:
        assert text[ch.index] == ch.message.content
        assert lps[ch.index] == [(t.token, round(t.logprob, 4), 2) for t in ch.logprobs.content]
        assert len(lps[ch.index]) == 6


def test_lora_adapter_served_matches_peft(model_dir, hf, tmp_path):
    """`lmstack serve --adapter`: the served model is the base plus the PEFT LoRA, as peft computes it."""
    import peft
    import transformers

    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)  # random A and B: the adapter changes the output
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    prompt = chat_ids(hf, MSGS)
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(prompt):].tolist()
    assert ref != hf_greedy(hf, prompt, 8)  # the adapter matters for this check
    app = create_app(L.load(model_dir, adapter=tmp_path / "adapter"), served_model_name="tiny-lora")
    with LiveServer(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny-lora", messages=MSGS, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == hf[1].decode(ref, skip_special_tokens=True)
