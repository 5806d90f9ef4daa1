"""The serving engine against transformers: greedy parity through paging, chunked prefill, preemption,
prefix caching and n > 1; logprobs; aborts; prefix-tuning KV."""

from __future__ import annotations

import pytest
import torch

from lmstack.model import load_model
from lmstack.serve.engine import LLMEngine
from lmstack.serve.errors import PromptTooLong
from lmstack.serve.llm import LLM, load
from lmstack.serve.types import SamplingParams
from tests.engine_fixtures import hf_greedy, hf_is_greedy, hf_model

torch.set_num_threads(2)

PROMPTS = [list(range(5, 25)), [30, 31, 32], [40, 41] * 18 + [7]]  # 20, 3 and 37 tokens
GREEDY = dict(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def arch_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"eng_{request.param}")
    model = hf_model(request.param, path)
    return request.param, path, model, hf_greedy(model, PROMPTS[2], 32)  # transformers generate, 32 tokens


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("eng_q2")
    return path, hf_model("qwen2", path)


def test_greedy_batch_matches_transformers(arch_dir):
    """A batch of 3 prompts (3, 20, 37 tokens): the 37-token one equals transformers ``generate``; all three
    are transformers' argmax at every step (teacher-forced check, one forward each)."""
    arch, path, model, ref = arch_dir
    llm = load(path, device="cpu")
    outs = llm.generate(PROMPTS, **GREEDY)
    assert outs[2].outputs[0].token_ids == ref, arch
    for o, p in zip(outs, PROMPTS):
        assert o.prompt_token_ids == p
        assert len(o.outputs[0].token_ids) == 32 and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].token_ids == hf_is_greedy(model, p, o.outputs[0].token_ids), arch
    assert llm.engine.block_manager.num_used == 0  # every block returned
    # alone (batch-1 decodes read a contiguous slice of the pool; mistral's window shortens it)
    assert llm.generate(PROMPTS[2], **GREEDY)[0].outputs[0].token_ids == ref


def test_chunked_prefill_preemption_and_tiny_blocks_keep_greedy_output(arch_dir):
    """4-token blocks, 7-token step budget (prefills split, mixed with decodes) and a pool of 24 blocks,
    too small for the 3 sequences at once: the newest is preempted and recomputed, output unchanged."""
    arch, path, hf, ref = arch_dir
    model = load_model(path, device="cpu")
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # K+V, layers, block, kv heads, head_dim, fp32
    if arch == "qwen3":
        per_block *= 2  # head_dim 32
    eng = LLM(model, max_num_batched_tokens=7, block_size=4, kv_cache_memory=24 * per_block)
    assert eng.engine.block_manager.num_blocks == 24
    outs = eng.generate(PROMPTS, **{**GREEDY, "max_tokens": 20})
    assert outs[2].outputs[0].token_ids == ref[:20]
    for o, p in zip(outs, PROMPTS):
        assert o.outputs[0].token_ids == hf_is_greedy(hf, p, o.outputs[0].token_ids)
    assert eng.engine.stats()["preemptions_total"] > 0
    assert eng.engine.block_manager.num_used == 0


def test_prefix_cache_reuses_blocks_and_keeps_output(qwen2):
    path, model = qwen2
    shared = list(range(3, 43))  # 40 shared tokens = 2 full 16-token blocks (+8)
    a, b = shared + [50, 51], shared + [60, 61, 62]
    llm = load(path, device="cpu")
    first = llm.generate([a], **GREEDY)[0].outputs[0].token_ids
    second = llm.generate([b], **GREEDY)[0]
    st = llm.engine.stats()
    assert st["prefix_cache_hits"] == 2  # b reuses a's two full blocks
    assert second.metrics.num_cached_prompt_tokens == 32
    assert first == hf_is_greedy(model, a, first)
    assert second.outputs[0].token_ids == hf_is_greedy(model, b, second.outputs[0].token_ids)
    again = llm.generate([a], **GREEDY)[0]  # whole prompt cached but the last token recomputed
    assert again.outputs[0].token_ids == first
    assert llm.engine.stats()["prefix_cache_hits"] == 4


def test_n_greater_than_one_and_seeds(qwen2):
    path, _ = qwen2
    llm = load(path, device="cpu")
    prompt = list(range(3, 40))
    out = llm.generate([prompt], n=3, temperature=2.0, seed=7, max_tokens=8, ignore_eos=True)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    texts = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(texts)) > 1  # different completions
    assert llm.engine.stats()["prefix_cache_hits"] >= 2  # completions 1, 2 reuse completion 0's prompt blocks
    # same seed, same tokens, whatever else is in the batch
    alone = llm.generate([prompt], temperature=2.0, seed=7, max_tokens=8, ignore_eos=True)[0]
    crowd = llm.generate([[9, 9, 9], prompt, list(range(50, 60))], temperature=2.0, seed=7, max_tokens=8,
                         ignore_eos=True)[1]
    assert alone.outputs[0].token_ids == crowd.outputs[0].token_ids == list(texts[0])
    other = llm.generate([prompt], temperature=2.0, seed=8, max_tokens=8, ignore_eos=True)[0]
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_logprobs_match_transformers_scores(qwen2):
    path, model = qwen2
    prompt = PROMPTS[0]
    llm = load(path, device="cpu")
    out = llm.generate([prompt], temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)[0].outputs[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:].log_softmax(-1)
    for t, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[t]
        assert lp.logprob == pytest.approx(float(want[t, lp.token_id]), abs=1e-4)
        assert list(lp.top) == want[t].topk(3).indices.tolist()
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))


def test_stop_token_ids_eos_and_min_tokens(qwen2):
    path, model = qwen2
    llm = load(path, device="cpu")
    ref = llm.generate([PROMPTS[0]], temperature=0, max_tokens=16, ignore_eos=True)[0].outputs[0].token_ids
    assert ref == hf_is_greedy(model, PROMPTS[0], ref)
    stop_id = ref[5]
    k = ref.index(stop_id)
    o = llm.generate([PROMPTS[0]], temperature=0, max_tokens=16, stop_token_ids=[stop_id])[0].outputs[0]
    assert o.token_ids == ref[:k + 1] and o.finish_reason == "stop" and o.stop_reason == stop_id
    # the same id as EOS stops too (stop_reason None); ignore_eos runs on
    eng = LLM(load_model(path, device="cpu"), eos_token_ids=[stop_id])
    o = eng.generate([PROMPTS[0]], temperature=0, max_tokens=16)[0].outputs[0]
    assert o.token_ids == ref[:k + 1] and o.finish_reason == "stop" and o.stop_reason is None
    o = eng.generate([PROMPTS[0]], temperature=0, max_tokens=16, ignore_eos=True)[0].outputs[0]
    assert o.token_ids == ref
    # min_tokens masks EOS until k + 2 tokens exist
    o = eng.generate([PROMPTS[0]], temperature=0, max_tokens=16, min_tokens=k + 2)[0].outputs[0]
    assert len(o.token_ids) >= k + 2 and stop_id not in o.token_ids[:k + 2]


def test_abort_frees_blocks_and_max_model_len(qwen2):
    path, _ = qwen2
    llm = load(path, device="cpu", max_model_len=40)
    eng = llm.engine
    eng.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), request_id="a")
    eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), request_id="b")
    eng.step()
    assert eng.block_manager.num_used > 0
    final = eng.abort_request("a")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    while eng.has_unfinished_requests():
        outs = eng.step()
    b = outs[-1].outputs[0]
    assert b.finish_reason == "length" and len(PROMPTS[0]) + len(b.token_ids) == 40  # capped by max_model_len
    assert eng.block_manager.num_used == 0
    with pytest.raises(PromptTooLong, match="41 tokens"):
        eng.add_request(list(range(41)), SamplingParams())


def _prefix_reference(model, pkv, prompt, n):
    """Greedy with tune's dense PrefixContext: full recompute each step, positions P, P+1, ..."""
    from lmstack.tune.prompt import PrefixContext

    P = pkv[0][0].shape[1]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            pos = torch.arange(P, P + len(ids))[None]
            ctx = PrefixContext(pkv, sliding_window=model.config.sliding_window)
            ids.append(int(model(torch.tensor([ids]), position_ids=pos, ctx=ctx)[0, -1].argmax()))
    return ids[len(prompt):]


def test_prefix_kv_zero_length_and_dense_reference(tmp_path):
    """Prefix-tuning KV: P=0 changes nothing; P=3 equals tune's dense PrefixContext (mistral: the sliding
    window also covers the prefix slots), through 4-token blocks and chunked prefill."""
    path = tmp_path / "m"
    hf_model("mistral", path)
    model = load_model(path, device="cpu")
    cfg = model.config
    L, nkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    prompt = PROMPTS[0]
    greedy = {**GREEDY, "max_tokens": 12}
    plain = LLM(model).generate([prompt], **greedy)[0].outputs[0].token_ids
    empty = [(torch.zeros(nkv, 0, D), torch.zeros(nkv, 0, D)) for _ in range(L)]
    assert LLM(model, adapter=_Rt(empty)).generate([prompt], **greedy)[0].outputs[0].token_ids == plain
    g = torch.Generator().manual_seed(0)
    pkv = [(torch.randn(nkv, 3, D, generator=g), torch.randn(nkv, 3, D, generator=g)) for _ in range(L)]
    llm = LLM(model, adapter=_Rt(pkv), block_size=4, max_num_batched_tokens=6)
    got = llm.generate([prompt, PROMPTS[1]], **greedy)
    assert got[0].outputs[0].token_ids == _prefix_reference(model, pkv, prompt, 12)
    assert got[1].outputs[0].token_ids == _prefix_reference(model, pkv, PROMPTS[1], 12)
    plain_short = LLM(model).generate([PROMPTS[1]], **greedy)[0].outputs[0].token_ids
    assert got[1].outputs[0].token_ids != plain_short  # the prefix matters (within the window)


def test_load_with_saved_prefix_adapter(tmp_path):
    """``load(path, adapter=DIR)`` goes through lmstack.tune.adapters.load_adapter."""
    from lmstack.tune.adapters import load_adapter, save_prompt_adapter
    from lmstack.tune.prompt import PromptEncoder, PromptSpec

    path = tmp_path / "m"
    hf_model("qwen2", path)
    model = load_model(path, device="cpu")
    enc = PromptEncoder(model, "prefix", PromptSpec(num_virtual_tokens=4, init="random"), seed=1)
    save_prompt_adapter(enc, model, tmp_path / "ad")
    llm = load(path, adapter=tmp_path / "ad", device="cpu")
    assert llm.adapter.num_virtual_tokens == 4
    got = llm.generate([PROMPTS[1]], **{**GREEDY, "max_tokens": 8})[0].outputs[0].token_ids
    pkv = load_adapter(model, tmp_path / "ad").prefix_kv
    assert got == _prefix_reference(model, pkv, PROMPTS[1], 8)


class _Rt:
    def __init__(self, prefix_kv):
        self.prefix_kv = prefix_kv


def test_engine_rejects_bad_input(qwen2):
    from lmstack.errors import ConfigError

    path, _ = qwen2
    eng = LLMEngine(load_model(path, device="cpu"))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        eng.add_request([1, 999999])
    with pytest.raises(ConfigError, match="no tokenizer"):
        eng.add_request("hello")
    with pytest.raises(ConfigError, match="empty"):
        eng.add_request([])
    with pytest.raises(ConfigError, match="top_p"):
        eng.add_request([1, 2], SamplingParams(top_p=0))
    with pytest.raises(ConfigError, match="unknown sampling parameter"):
        LLM(load_model(path, device="cpu")).generate([[1, 2]], temprature=0.5)


def test_stress_small_pool_random_lengths_and_aborts(qwen2):
    """8 requests of random lengths through a 14-block pool with a 16-token budget and an abort mid-way:
    greedy outputs equal an unconstrained engine's, and every block's reference count returns to 0."""
    path, _ = qwen2
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (8,), generator=g)]
    free = load(path, device="cpu").generate(prompts, **{**GREEDY, "max_tokens": 8})
    model = load_model(path, device="cpu")
    per_block = 2 * 2 * 4 * 2 * 16 * 4
    llm = LLM(model, block_size=4, kv_cache_memory=14 * per_block, max_num_batched_tokens=16, max_num_seqs=6)
    eng = llm.engine
    params = SamplingParams(**{**GREEDY, "max_tokens": 8})
    for i, p in enumerate(prompts):
        eng.add_request(p, params, request_id=str(i))
    done, steps = {}, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        if steps == 6:
            eng.abort_request("5")
    assert "5" not in done
    for i in range(8):
        if i != 5:
            assert done[str(i)].outputs[0].token_ids == free[i].outputs[0].token_ids, i
    assert eng.stats()["preemptions_total"] > 0
    assert eng.block_manager.num_used == 0 and all(r == 0 for r in eng.block_manager.ref_count)
