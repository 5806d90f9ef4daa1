"""Speculative decoding (lmstack.serve.speculative): the acceptance rule against its formula, the engine's output
against the target alone (greedy: identical; sampled: the target's distribution), KV blocks, fallbacks."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.errors import ConfigError
from lmstack.model import load_model
from lmstack.serve.engine import LLMEngine
from lmstack.serve.speculative import SpeculativeEngine, accept, accept_greedy
from lmstack.serve.types import SamplingParams
from tests.engine_fixtures import hf_model

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------- the rule
P = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
Q = torch.tensor([[0.2, 0.2, 0.2, 0.4]])


def test_first_token_has_the_target_distribution_and_kept_with_min_1_p_over_q():
    """Draft token d ~ q; emitted first token must be ~ p (Leviathan et al. 2023, theorem 1); d is kept with
    probability min(1, p(d) / q(d)): 1 for tokens 0 and 1, 0 for token 3 (p = 0), 1 for 2 (p == q)."""
    g = torch.Generator().manual_seed(0)
    n = 6000
    first = torch.zeros(4)
    kept = torch.zeros(4)
    drawn = torch.zeros(4)
    for _ in range(n):
        d = int(torch.multinomial(Q[0], 1, generator=g))
        out = accept(P, Q, [d], g)
        first[out[0]] += 1
        drawn[d] += 1
        kept[d] += len(out) == 2
    emp = first / n
    assert (emp - P[0]).abs().max() < 0.03, emp  # 6k draws: sd <= 0.0065
    want_keep = torch.minimum(torch.ones(4), P[0] / Q[0])
    torch.testing.assert_close(kept / drawn, want_keep, atol=0.05, rtol=0)  # ~1.2k draws of token 0-2: sd < 0.015
    assert kept[3] == 0 and kept[0] == drawn[0]


def test_rejection_resamples_from_the_normalized_residual():
    """Rejected d = 3 (p(3) = 0): the token comes from max(0, p - q) / sum = [0.3, 0.1, 0, 0] / 0.4."""
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(3000):
        out = accept(P, Q, [3], g)
        assert len(out) == 1
        counts[out[0]] += 1
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.75, 0.25, 0.0, 0.0]), atol=0.035, rtol=0)


def test_all_kept_draws_the_bonus_token_from_the_last_target_row():
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    counts = torch.zeros(4)
    for _ in range(2000):
        out = accept(p, p[:2], [1, 2], g)  # p == q: always kept
        assert out[:2] == [1, 2] and len(out) == 3
        counts[out[2]] += 1
    assert (counts / counts.sum() - 0.25).abs().max() < 0.04  # sd 0.01


def test_greedy_rule():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]
    assert accept_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]
    assert accept_greedy([1, 2], [3]) == [1]


# ---------------------------------------------------------------------------------------------- the engine
PROMPTS = [list(range(5, 25)), [30, 31, 32], [40, 41] * 9 + [7]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    hf_model("qwen2", d / "target", seed=0)
    hf_model("qwen2", d / "other", seed=1)  # a draft that rarely agrees
    return d


def _engine(target, draft=None, k=3, **kw):
    m = load_model(target, device="cpu")
    if draft is None:
        return LLMEngine(m, block_size=4, **kw)
    return SpeculativeEngine(m, draft_model=load_model(draft, device="cpu"), num_speculative_tokens=k,
                             block_size=4, **kw)


def _run(eng, prompts, params):
    reqs = [eng.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
    while eng.has_unfinished_requests():
        eng.step()
    return [list(r.seqs[0].output_token_ids) for r in reqs]


@pytest.mark.parametrize("draft,k", [("target", 3), ("other", 2), ("target", 5)])
def test_greedy_output_identical_to_the_target_alone(models, draft, k):
    params = SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)
    want = _run(_engine(models / "target"), PROMPTS, params)
    eng = _engine(models / "target", models / draft, k)
    got = _run(eng, PROMPTS, params)
    assert got == want
    st = eng.stats()
    assert st["spec_steps"] > 0 and st["spec_emitted"] > 0
    if draft == "target":  # the draft is the target: every proposal is kept
        assert st["spec_acceptance_rate"] == 1.0 and st["spec_steps"] <= 3 * -(-16 // (k + 1)) + 3
    else:
        assert st["spec_acceptance_rate"] < 0.5
    # every KV block is back in both pools
    assert eng.block_manager.num_used == 0 and eng.draft_bm.num_used == 0 and not eng.draft_seqs


@pytest.mark.parametrize("draft,k", [("target", 4), ("other", 3)])
def test_kernel_verification_pass_equals_the_target_alone(models, draft, k):
    """One sequence's K+1 verification rows fit the compiled decode kernel: they run there as one-token rows at
    consecutive positions sharing the block table (each row's K/V is written before any row attends)."""
    params = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    want = _run(_engine(models / "target"), PROMPTS[:1], params)
    eng = _engine(models / "target", models / draft, k)
    if eng.runner.kernel is None:
        pytest.skip("the compiled CPU decode kernel is unavailable here")
    assert _run(eng, PROMPTS[:1], params) == want
    assert eng.spec_stats["kernel_verify"] == eng.spec_stats["steps"] > 0
    assert eng.block_manager.num_used == 0 and eng.draft_bm.num_used == 0


def test_continuous_batching_with_arrivals_and_stops(models):
    """Requests arriving while others decode, different max_tokens, a stop token: same outputs as without."""
    def drive(eng):
        outs = {}
        p = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 14, 5)]
        eng.add_request(PROMPTS[0], p[0], request_id="0")
        for step in range(200):
            if step == 2:
                eng.add_request(PROMPTS[1], p[1], request_id="1")
            if step == 4:
                eng.add_request(PROMPTS[2], p[2], request_id="2")
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = list(o.outputs[0].token_ids)
            if len(outs) == 3:
                break
        return outs

    want = drive(_engine(models / "target"))
    eng = _engine(models / "target", models / "target", 4)
    assert drive(eng) == want
    stop = want["1"][6]
    params = SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[stop])
    a = _run(_engine(models / "target"), [PROMPTS[1]], params)
    b = _run(_engine(models / "target", models / "target", 4), [PROMPTS[1]], params)
    assert a == b and a[0][-1] == stop and len(a[0]) <= 7


def test_sampled_output_has_the_target_distribution(models):
    """Token 2 of many temperature-1 completions (token 1 comes from the prefill step, token 2 from a speculative
    step with a draft that disagrees often) against its exact marginal sum_t1 p(t1) p(t2 | t1) from the target."""
    prompt = PROMPTS[1]
    target = load_model(models / "target", device="cpu")
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)  # (V,)
        V = p1.shape[0]
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        p2 = target(seqs)[:, -1].softmax(-1)  # (V, V): row t1
    want = p1 @ p2
    eng = _engine(models / "target", models / "other", 2, max_num_seqs=512)
    n = 3000
    params = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True)
    reqs = [eng.add_request(prompt, params) for _ in range(n)]
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.spec_stats["steps"] > 0 and eng.spec_stats["accepted"] < eng.spec_stats["proposed"]
    counts = torch.bincount(torch.tensor([r.seqs[0].output_token_ids[1] for r in reqs]), minlength=V).float()
    tv = 0.5 * (counts / n - want).abs().sum().item()
    # sampling noise alone: E[TV] ~ sum sqrt(p (1 - p) / n) / 2 over the support
    noise = 0.5 * (want * (1 - want) / n).sqrt().sum().item()
    assert tv < 2.5 * noise + 0.01, (tv, noise)


def test_falls_back_for_what_the_rule_does_not_carry(models):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={7: 5.0})
    want = _run(_engine(models / "target"), PROMPTS[:2], params)
    eng = _engine(models / "target", models / "target", 3)
    assert _run(eng, PROMPTS[:2], params) == want
    assert eng.spec_stats["steps"] == 0 and eng.fallbacks["logits processors (structured output, logit_bias)"] > 0
    lp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    eng = _engine(models / "target", models / "target", 3)
    _run(eng, PROMPTS[:1], lp)
    assert eng.fallbacks["log-probs"] > 0


def test_bad_configurations(models, tmp_path):
    hf_model("qwen2", tmp_path / "small_vocab", vocab_size=64)
    with pytest.raises(ConfigError, match="vocabulary"):
        _engine(models / "target", tmp_path / "small_vocab")
    with pytest.raises(ConfigError, match="num-speculative-tokens"):
        _engine(models / "target", models / "target", k=0)


def test_load_api_with_a_speculative_model_directory(models):
    llm = lmstack.load(models / "target", speculative_model=models / "target", num_speculative_tokens=3,
                       max_num_seqs=2)
    assert isinstance(llm.engine, SpeculativeEngine) and llm.engine.k == 3
    ref = lmstack.load(models / "target", max_num_seqs=2)
    a = llm.generate([PROMPTS[0]], temperature=0, max_tokens=10, ignore_eos=True)[0].outputs[0].token_ids
    b = ref.generate([PROMPTS[0]], temperature=0, max_tokens=10, ignore_eos=True)[0].outputs[0].token_ids
    assert list(a) == list(b) and llm.engine.spec_stats["accepted"] > 0


def test_served_with_a_draft_over_http_and_the_generate_cli(tmp_path, capsys):
    """lmstack serve --speculative-model: the OpenAI client's greedy completion equals the target alone's;
    lmstack generate --speculative-model prints the same text as without; a missing draft is one line, exit 2."""
    from openai import OpenAI

    from lmstack.cli import main
    from lmstack.serve.api.app import create_app
    from tests.serve_fixtures import LiveServer, tiny_model_dir

    d = tiny_model_dir(tmp_path / "m")
    llm = lmstack.load(d, speculative_model=d, num_speculative_tokens=3, max_num_seqs=4)
    ref = lmstack.load(d, max_num_seqs=4)
    want = ref.generate(["The quick brown fox"], temperature=0, max_tokens=12, ignore_eos=True)[0].outputs[0].text
    with LiveServer(create_app(llm)) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="x")
        got = client.completions.create(model=llm.model_name, prompt="The quick brown fox", max_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert got == want and llm.engine.spec_stats["accepted"] > 0
    args = ["generate", "--model", str(d), "-p", "The quick brown fox", "-t", "0", "-n", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative-model", str(d), "--num-speculative-tokens", "2"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--speculative-model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
