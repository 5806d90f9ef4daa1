"""Sampler numerics against transformers' logits processors, penalties against the published formulas,
and the stop-string detokenizer (no model needed)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmstack.serve.detokenizer import IncrementalDetokenizer
from lmstack.serve.sampler import Sampler, apply_penalties, filter_logits
from lmstack.serve.sequence import Request, Sequence
from lmstack.serve.types import SamplingParams

torch.set_num_threads(2)
V = 50


def _logits(B=4, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _ours(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    B = logits.shape[0]
    f = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt)  # noqa: E731
    return filter_logits(logits, f(temperature), f(top_k, torch.long), f(top_p), f(min_p))


@pytest.mark.parametrize("kw,warpers", [
    (dict(temperature=0.7), [TemperatureLogitsWarper(0.7)]),
    (dict(top_k=5), [TopKLogitsWarper(5)]),
    (dict(top_p=0.8), [TopPLogitsWarper(0.8)]),
    (dict(top_p=0.3), [TopPLogitsWarper(0.3)]),
    (dict(min_p=0.1), [MinPLogitsWarper(0.1)]),
    (dict(temperature=1.3, top_k=10, top_p=0.9, min_p=0.05),
     [TemperatureLogitsWarper(1.3), TopKLogitsWarper(10), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)]),
])
def test_filters_match_transformers(kw, warpers):
    logits = _logits()
    want = logits.clone()
    for w in warpers:
        want = w(None, want)
    got = _ours(logits, **kw)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    keep = ~torch.isinf(want)
    torch.testing.assert_close(got[keep], want[keep])


def test_per_row_parameters_are_independent():
    logits = _logits(2)
    got = filter_logits(logits, torch.tensor([1.0, 0.5]), torch.tensor([3, 0]), torch.tensor([1.0, 0.5]),
                        torch.tensor([0.0, 0.0]))
    row0 = TopKLogitsWarper(3)(None, logits[:1].clone())
    row1 = TopPLogitsWarper(0.5)(None, TemperatureLogitsWarper(0.5)(None, logits[1:].clone()))
    assert torch.equal(torch.isinf(got), torch.isinf(torch.cat([row0, row1])))


def _seq(prompt, out, **params):
    p = SamplingParams(**params)
    req = Request("r", None, list(prompt), p)
    s = Sequence(0, req, 0, list(prompt) + list(out), len(prompt), None, None)
    req.seqs.append(s)
    return s


def test_repetition_penalty_matches_transformers():
    logits = _logits(1)
    seq = _seq([1, 2, 3, 7], [7, 9], repetition_penalty=1.3)
    got = apply_penalties(logits.clone(), [seq], set())
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seq.token_ids]), logits.clone())
    torch.testing.assert_close(got, want)


def test_presence_frequency_penalties_formula():
    # OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, over generated tokens only
    logits = torch.zeros(1, V)
    seq = _seq([4, 4], [5, 5, 5, 6], presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits.clone(), [seq], set())[0]
    assert got[5] == pytest.approx(-(3 * 0.25 + 0.5))
    assert got[6] == pytest.approx(-(0.25 + 0.5))
    assert got[4] == 0 and got[0] == 0  # prompt tokens are not penalised


def test_min_tokens_masks_eos_and_stop_ids():
    seq = _seq([1], [3], min_tokens=2, stop_token_ids=[11])
    got = apply_penalties(torch.zeros(1, V), [seq], {2})[0]
    assert torch.isinf(got[[2, 11]]).all() and not torch.isinf(got[3])
    seq_done = _seq([1], [3, 4], min_tokens=2)
    assert not torch.isinf(apply_penalties(torch.zeros(1, V), [seq_done], {2})).any()


def test_sampling_follows_the_filtered_distribution():
    """Seeded draws from top_k=2: only the 2 best tokens appear, in proportion to their renormalised probs."""
    logits = torch.full((1, V), -5.0)
    logits[0, 3], logits[0, 8] = 1.0, 0.0
    s = Sampler(set(), torch.device("cpu"))
    seq = _seq([1], [], temperature=1.0, top_k=2, seed=0)
    seq.generator = Sampler.make_generator(seq.params, 0, torch.device("cpu"))
    draws = [s(logits.clone(), [seq])[0][0] for _ in range(600)]
    assert set(draws) == {3, 8}
    p3 = torch.tensor([1.0, 0.0]).softmax(0)[0].item()  # 0.731
    assert abs(draws.count(3) / 600 - p3) < 0.06


class _CharDecoder:
    """Stream decoder over a fixed vocabulary of strings (token id -> text)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def step(self, t):
        return self.vocab[t]

    def flush(self):
        return ""


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def stream_decoder(self, skip_special_tokens=True):
        return _CharDecoder(self.vocab)


def test_stop_strings_are_cut_and_never_streamed():
    vocab = ["Hel", "lo", " wo", "rld", "!", " EN", "D", " E", "x"]
    # "Hello world END" with stop " END": the partial " E" / " EN" must be held back, then removed
    det = IncrementalDetokenizer(_Tok(vocab), stop=[" END"])
    shown = []
    sent = 0
    for t in [0, 1, 2, 3, 5, 6]:
        stop = det.step(t)
        vis = det.visible_text(final=stop is not None)
        shown.append(vis[sent:])
        sent = len(vis)
        if stop:
            break
    assert stop == " END" and det.text == "Hello world"
    assert "".join(shown) == "Hello world" and not any("E" in s for s in shown)
    # a held-back prefix that turns out not to be a stop string is released
    det = IncrementalDetokenizer(_Tok(vocab), stop=[" END"])
    for t in [0, 7]:
        det.step(t)
    assert det.visible_text(False) == "Hel"
    det.step(8)
    assert det.visible_text(False) == "Hel Ex"
    # include_stop_str_in_output keeps it; the earliest of several stop strings wins
    det = IncrementalDetokenizer(_Tok(vocab), stop=["rld", "wo"], include_stop=True)
    for t in [0, 1, 2, 3]:
        if det.step(t):
            break
    assert det.text == "Hello wo"


def test_block_manager_chained_hashes_refcounts_and_lru_eviction():
    from lmstack.serve.block_manager import BlockManager

    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5], [])
    assert bm.match_prefix(a) == 0 and bm.ensure_slots(a, 5) and len(a.block_table) == 3
    a.num_computed_tokens = 5
    bm.register_computed(a)  # blocks [1,2] and [3,4] are full -> cached
    b = _seq([1, 2, 3, 4, 9], [])
    assert bm.match_prefix(b) == 4 and b.block_table == a.block_table[:2]
    assert [bm.ref_count[x] for x in a.block_table] == [2, 2, 1]
    c = _seq([7, 7, 3, 4, 9], [])  # same second block, different prefix: the chain does not match
    assert bm.match_prefix(c) == 0
    assert not bm.ensure_slots(c, 5)  # 1 free block, 3 needed: nothing allocated
    assert c.block_table == [] and bm.num_free == 1
    bm.free_seq(b)
    bm.free_seq(a)
    assert bm.num_used == 0 and all(r == 0 for r in bm.ref_count)
    # fresh allocations take uncached blocks first, then evict cached ones least recently freed first:
    # a's tail block ([3, 4]) was freed before its head ([1, 2])
    d = _seq([8] * 5, [])
    assert bm.ensure_slots(d, 6)  # 3 blocks: the 2 uncached ones, then [3, 4] is evicted
    f = _seq([1, 2, 3, 4, 9], [])
    assert bm.match_prefix(f) == 2  # [1, 2] survived, [3, 4] is gone
    assert bm.prefix_hits == 3


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("max_tokens", 0),
    ("min_tokens", -1), ("min_tokens", 17), ("logprobs", 21), ("stop", [""]),
])
def test_sampling_params_name_the_field_out_of_range(field, value):
    from lmstack.errors import ConfigError
    from lmstack.serve.errors import InvalidSamplingParam

    with pytest.raises(InvalidSamplingParam) as ei:
        SamplingParams(**{field: value}).validate()  # max_tokens defaults to 16
    assert ei.value.param == field and ei.value.args[0].startswith(field)
    assert isinstance(ei.value, ConfigError)  # the CLI prints it as one line


def test_sampling_params_accept_the_engine_range_beyond_openai_limits():
    """OpenAI caps n at 128 and temperature at 2; the engine does not (pass@k with n=200, hot sampling offline)."""
    p = SamplingParams(n=200, temperature=3.0, stop="END", min_tokens=16, logprobs=20)
    p.validate()
    assert p.stop == ["END"]
