"""Non-finite logits in one sequence finish that sequence alone (issue 18).

Before: a NaN / inf row went to ``argmax`` (a garbage token, silently) or to ``torch.multinomial``, which raised
and failed the engine step of every request in the batch. Now the sequence finishes with ``finish_reason``
"error", the others of the same step produce what they produce alone (greedy: ``transformers``' tokens; seeded
sampling: their own solo run), the KV blocks are freed (NaN K/V zeroed, so a later request reusing them is
not poisoned) and the server answers that request alone with a 500 JSON error or an SSE error event.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from tests.engine_fixtures import hf_greedy, text_model_dir

N = 8
PROMPTS = [[5, 17, 33, 9, 60, 4], [7, 7, 101, 3, 44, 90, 12], [200, 13, 8, 77, 31], [66, 2, 150, 19]]
POISON = 250  # a token id none of PROMPTS holds: its embedding row is set to NaN where a test needs NaN K/V


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # llama: untied embeddings, so a NaN embedding row does not reach the lm_head (a tokenizer for the server)
    return text_model_dir(tmp_path_factory.mktemp("nan_llama"), arch="llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    _, hf = model_dir
    return [hf_greedy(hf, p, N) for p in PROMPTS]


class Poison:
    """A logits processor that turns this sequence's row non-finite once it has taken ``after`` tokens."""

    satisfied = None

    def __init__(self, kind: str, after: int):
        self.kind, self.after, self.taken = kind, after, 0

    def __call__(self, row, seq):
        if self.taken < self.after:
            return row
        row = row.clone()
        if self.kind == "nan":
            row[:] = float("nan")
        elif self.kind == "one_nan":
            row[3] = float("nan")
        else:  # "inf"
            row[5] = float("inf")
        return row

    def accept(self, token_id):
        self.taken += 1


def _load(path, **kw):
    from lmstack.serve.llm import load

    return load(path, **kw)


def _params(**kw):
    from lmstack.serve.types import SamplingParams

    return SamplingParams(max_tokens=N, ignore_eos=True, **kw)


@pytest.mark.parametrize("kind", ["nan", "one_nan", "inf"])
def test_one_sequence_with_non_finite_logits_finishes_alone(model_dir, reference, kind):
    path, _ = model_dir
    llm = _load(path, use_kernel=False)
    eng = llm.engine
    sampled = _params(temperature=0.9, top_p=0.95, seed=11)
    alone = llm.generate([PROMPTS[3]], sampled)[0].outputs[0].token_ids  # a seeded draw, run alone
    reqs = [eng.add_request(PROMPTS[0], _params(temperature=0)),
            eng.add_request(PROMPTS[1], _params(temperature=0, logits_processors=[lambda: Poison(kind, 3)])),
            eng.add_request(PROMPTS[2], _params(temperature=0)),
            eng.add_request(PROMPTS[3], sampled)]
    done = {}
    for _ in range(4 * N):  # bounded: a step that failed the batch would raise here
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        if len(done) == 4:
            break
    got = [done[r.request_id] for r in reqs]
    assert got[1].finish_reason == "error"
    assert got[1].token_ids == reference[1][:3]  # the tokens before the poisoned step were right
    assert got[0].token_ids == reference[0] and got[2].token_ids == reference[2]
    assert [o.finish_reason for o in (got[0], got[2], got[3])] == ["length"] * 3
    assert got[3].token_ids == alone
    assert eng.block_manager.num_used == 0 and not eng.requests and not eng.scheduler.running
    again = llm.generate([PROMPTS[1]], _params(temperature=0))[0].outputs[0]  # the engine keeps serving
    assert again.token_ids == reference[1]


def test_temperature_that_overflows_float32_is_an_error_for_that_row_only():
    """A logit of 1e36 divided by a temperature of 1e-5 is +inf in float32: that row's softmax is NaN, and
    ``torch.multinomial`` raised for the whole batch. The other rows are still drawn."""
    from lmstack.serve.sampler import NON_FINITE, Sampler
    from lmstack.serve.sequence import Request, Sequence

    logits = torch.randn(3, 16)
    logits[1, 4] = 1e36
    seqs = []
    for i, t in enumerate((0.7, 1e-5, 0.7)):
        p = _params(temperature=t, seed=i)
        req = Request(f"r{i}", None, [1, 2], p)
        seqs.append(Sequence(i, req, 0, [1, 2], 2, Sampler.make_generator(p, 0, torch.device("cpu")), None))
    chosen, _ = Sampler(set(), torch.device("cpu"))(logits.clone(), seqs)
    assert chosen[1] == NON_FINITE and all(0 <= c < 16 for c in (chosen[0], chosen[2]))


@pytest.mark.parametrize("use_kernel", [False, None], ids=["eager", "default"])
def test_nan_kv_is_scrubbed_so_a_later_request_is_not_poisoned(model_dir, reference, use_kernel):
    """NaN in the model itself (an embedding row): the sequence's K/V blocks hold NaN. They are zeroed before
    reuse; a stale NaN in a masked slot would turn every later attention over that block into NaN."""
    path, _ = model_dir
    from lmstack.serve.runner import ModelRunner

    probe = _load(path, use_kernel=False)
    per_block = ModelRunner.kv_bytes_per_block(probe.engine.model, 4)
    llm = _load(path, block_size=4, kv_cache_memory=per_block * 12, use_kernel=use_kernel)
    eng = llm.engine
    with torch.no_grad():
        eng.model.model.embed_tokens.weight[POISON] = float("nan")
    bad_prompt = PROMPTS[1][:3] + [POISON] + PROMPTS[1][3:]
    outs = llm.generate([PROMPTS[0], bad_prompt, PROMPTS[2]], _params(temperature=0))
    assert outs[1].outputs[0].finish_reason == "error" and outs[1].outputs[0].token_ids == []
    assert outs[0].outputs[0].token_ids == reference[0] and outs[2].outputs[0].token_ids == reference[2]
    assert eng.block_manager.num_used == 0
    for k, v in zip(eng.runner.k_pool, eng.runner.v_pool):
        assert torch.isfinite(k).all() and torch.isfinite(v).all()
    # the freed blocks go to the next requests (12 blocks, 2 x 4 needed): all of them are reused
    outs = llm.generate([PROMPTS[3], PROMPTS[1], PROMPTS[0]], _params(temperature=0))
    assert [o.outputs[0].token_ids for o in outs] == [reference[3], reference[1], reference[0]]
    assert eng.block_manager.num_used == 0


def test_async_engine_fails_only_the_request_with_non_finite_logits(model_dir, reference):
    from lmstack.serve.async_engine import AsyncEngine
    from lmstack.serve.errors import NonFiniteLogits

    path, _ = model_dir
    llm = _load(path)

    async def run():
        eng = AsyncEngine(llm)

        async def one(prompt, params):
            last = None
            async for out in eng.generate(prompt, params):
                last = out
            return last.outputs[0].token_ids

        res = await asyncio.gather(
            one(PROMPTS[0], _params(temperature=0)),
            one(PROMPTS[1], _params(temperature=0, n=2, logits_processors=[lambda: Poison("nan", 2)])),
            one(PROMPTS[2], _params(temperature=0)), return_exceptions=True)
        after = await one(PROMPTS[3], _params(temperature=0))
        await eng.shutdown()
        return res, after

    res, after = asyncio.run(run())
    assert isinstance(res[1], NonFiniteLogits) and "after 2 generated tokens" in str(res[1])
    assert res[0] == reference[0] and res[2] == reference[2] and after == reference[3]
    assert llm.engine.block_manager.num_used == 0 and not llm.engine.requests  # the n=2 sibling was freed too


def test_server_answers_that_request_with_500_or_an_sse_error_and_keeps_serving(model_dir, reference):
    """A request that fails before its first token is a 500 (OpenAI's error body); one that fails mid-stream
    ends with an SSE error event and [DONE] after the tokens already sent; the next request is answered."""
    from lmstack.serve.api import create_app
    from tests.serve_fixtures import LiveServer

    path, _ = model_dir
    llm = _load(path)
    t = reference[1][2]  # the 3rd greedy token of PROMPTS[1]: NaN from the step that feeds it back
    assert t not in PROMPTS[1] + reference[1][:2] and t not in PROMPTS[2] + reference[2]
    with torch.no_grad():
        llm.engine.model.model.embed_tokens.weight[t] = float("nan")
    with LiveServer(create_app(llm, served_model_name="tiny")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt=PROMPTS[0] + [t], max_tokens=N, temperature=0)
        assert e.value.status_code == 500 and "non-finite logits" in e.value.message
        assert e.value.body["type"] == "server_error"
        r = httpx.post(s.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": PROMPTS[1], "max_tokens": N, "temperature": 0, "stream": True,
            "ignore_eos": True})
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "after 3 generated tokens" in err["message"]
        chunks = [json.loads(x) for x in events[:-2]]
        assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
        ok = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=N, temperature=0,
                                       extra_body={"ignore_eos": True})
        assert ok.choices[0].finish_reason == "length" and ok.usage.completion_tokens == N
        assert llm.engine.block_manager.num_used == 0
