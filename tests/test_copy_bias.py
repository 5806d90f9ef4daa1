"""Grounded decoding (``lmstack.serve.logits.CopyBias``, ``SamplingParams.copy``): a logit bonus for quoting the
retrieved texts, checked against a hand computation of the rule on fixed logits, then through the engine on a
real tiny model against the same rule applied to ``transformers``' own logits step by step."""

from __future__ import annotations

import pytest
import torch

from lmstack.serve.logits import CopyBias
from lmstack.serve.types import CopyFrom, InvalidSamplingParam, SamplingParams
from tests.engine_fixtures import text_model_dir


def test_rule_on_fixed_logits():
    src = [[1, 2, 3], [4, 2, 5], [7, 8]]
    p = CopyBias(src, bias=2.0, start_bias=5.0, max_n=2)
    zero = torch.zeros(10)
    # first token: the start bonus on the first token of every text (1, 4, 7), nothing else
    assert p(zero.clone(), None).tolist() == [0, 5, 0, 0, 5, 0, 0, 5, 0, 0]
    p.accept(9)  # not in any text: no n-gram matches, no bonus
    assert p(zero.clone(), None).tolist() == [0] * 10
    p.accept(2)  # unigram (2,) is followed by 3 and by 5
    assert p(zero.clone(), None).tolist() == [0, 0, 0, 2, 0, 2, 0, 0, 0, 0]
    q = CopyBias(src, bias=2.0, max_n=2)
    for t in (1, 2):
        q.accept(t)  # the bigram (1, 2) matches the first text only: its continuation alone (longest match wins)
    assert q(zero.clone(), None).tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0]
    q.accept(3)  # end of the first text: (2, 3) and (3,) are followed by nothing
    assert q(zero.clone(), None).tolist() == [0] * 10
    # no match across two texts: 3 is never followed by 4
    r = CopyBias(src, bias=1.0)
    r.accept(3)
    assert r(zero.clone(), None).tolist() == [0] * 10
    # another sequence of the same request: the same table, its own (empty) output
    f = q.fresh()
    assert f.next is q.next and f.out == [] and q.out == [1, 2, 3]
    assert f(zero.clone(), None).tolist() == [0] * 10  # no start bonus on q: nothing
    # a banned token stays banned
    s = CopyBias([[1, 2]], bias=3.0, start_bias=3.0)
    row = torch.zeros(4)
    row[1] = float("-inf")
    assert s(row, None)[1] == float("-inf")


def test_copy_params_validated():
    with pytest.raises(InvalidSamplingParam, match="copy"):
        SamplingParams(copy=CopyFrom(("a",), bias=500.0)).validate()
    with pytest.raises(InvalidSamplingParam, match="copy"):
        SamplingParams(copy=CopyFrom(tuple("x" * 5000 for _ in range(2)))).validate()
    with pytest.raises(ValueError, match="min_n"):
        CopyBias([[1]], min_n=0)
    SamplingParams(copy=CopyFrom(("fine",), bias=4.0, start_bias=2.0)).validate()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lmstack.serve.llm import load

    path, hf = text_model_dir(tmp_path_factory.mktemp("copy"))
    return load(path), hf


def _reference(hf, tok, prompt_ids, texts, bias, start_bias, n):
    """Greedy decoding with transformers' logits and the bonus rule written out here."""
    src = [tok.encode(t) for t in texts]
    ids, out = list(prompt_ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float().clone()
        if not out:
            logits[sorted({s[0] for s in src})] += start_bias
        else:
            for k in range(min(4, len(out)), 0, -1):
                follow = {s[j] for s in src for j in range(k, len(s)) if s[j - k:j] == out[-k:]}
                if follow:
                    logits[sorted(follow)] += bias
                    break
        t = int(logits.argmax())
        out.append(t)
        ids.append(t)
    return out


def test_engine_matches_the_rule_and_quotes(tiny):
    llm, hf = tiny
    tok = llm.tokenizer
    prompt = tok.encode("Hello world! The quick")
    texts = ["Language models predict the next token.", "Serving many requests at once."]
    n = 12
    plain = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    for bias, start in ((3.0, 3.0), (100.0, 100.0)):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                copy=CopyFrom(tuple(texts), bias=bias, start_bias=start))
        got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == _reference(hf, tok, prompt, texts, bias, start, n)
    # a bonus of 100 all but forces the quote: the output starts with one of the texts, token for token
    quotes = [tok.encode(t) for t in texts]
    assert any(got[:min(n, len(q))] == q[:n] for q in quotes)
    assert got != plain


def test_longest_suffix_decides():
    src = [5, 6, 7, 8, 5, 6, 9]  # "5 6" is followed by 7 and by 9
    p = CopyBias([src], bias=2.0, max_n=3)
    assert p.satisfied is None
    assert torch.equal(p(torch.zeros(12), None), torch.zeros(12))  # nothing generated, no start bonus: no bias
    for t in (1, 5, 6):
        p.accept(t)
    row = p(torch.zeros(12), None)
    assert row.nonzero().flatten().tolist() == [7, 9] and row[7] == 2.0  # the longest suffix found: (5, 6)
    p.accept(7)
    assert set(p.followers(p.out)) == {8}  # (5, 6, 7) -> 8
    p.accept(3)  # 3 is in no text: back to nothing
    assert not p.followers(p.out)
    assert not CopyBias([src], min_n=2).followers([4, 6])  # one token of overlap is not enough


def test_weights_on_fixed_logits():
    """Per-text weights: a token gets bias (or start_bias) plus the largest weight of the texts that offer it."""
    src = [[1, 2, 3], [1, 2, 5], [4, 2, 3]]
    p = CopyBias(src, bias=2.0, start_bias=1.0, max_n=2, weights=[-0.5, -3.0, -1.0])
    zero = torch.zeros(8)
    # first token 1 is offered by texts 0 (-0.5) and 1 (-3.0): the larger; 4 by text 2 (-1.0)
    assert p(zero.clone(), None).tolist() == [0, 0.5, 0, 0, 0.0, 0, 0, 0]
    p.accept(1)
    assert p(zero.clone(), None).tolist() == [0, 0, 1.5, 0, 0, 0, 0, 0]  # (1,) -> 2 in texts 0 and 1: -0.5
    p.accept(2)  # (1, 2) -> 3 (text 0) or 5 (text 1): where the quotes part ways, their weights differ
    assert p(zero.clone(), None).tolist() == [0, 0, 0, 1.5, 0, -1.0, 0, 0]
    q = CopyBias(src, bias=2.0, max_n=1, weights=[-0.5, -3.0, -1.0])
    q.accept(2)  # (2,) -> 3 in texts 0 (-0.5) and 2 (-1.0), -> 5 in text 1 (-3.0)
    assert q(zero.clone(), None).tolist() == [0, 0, 0, 1.5, 0, -1.0, 0, 0]
    with pytest.raises(ValueError, match="2 weights for 3 texts"):
        CopyBias(src, weights=[0.0, 0.0])


def test_a_quote_from_the_first_token_follows_its_own_text():
    """While the whole output is the start of a text, only that text's next token gets the bonus (a 1-token
    suffix match alone would also offer the other text's continuation of the shared token); once the output
    leaves every text, the suffix rule takes over."""
    src = [[1, 2, 3], [9, 2, 5]]
    p = CopyBias(src, bias=2.0, max_n=1)
    zero = torch.zeros(10)
    for t in (1, 2):
        p.accept(t)
    assert p(zero.clone(), None).tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0]  # text 0 only, not 5 of text 1
    q = CopyBias(src, bias=2.0, max_n=1)
    for t in (7, 2):  # 7 starts no text: the unigram (2,) is followed by 3 and by 5
        q.accept(t)
    assert q(zero.clone(), None).tolist() == [0, 0, 0, 2, 0, 2, 0, 0, 0, 0]
    r = q.fresh()
    assert r.out == [] and r.quoting == [0, 1]


def test_weights_are_a_product_of_experts():
    """At the token where two quotes part ways, bias + log p_ranker(text) makes the next-token distribution over
    the two continuations the model's times the ranker's, renormalised (the published product-of-experts rule)."""
    lm = torch.tensor([0.0, 0.0, 0.0, 1.2, 0.0, -0.4])  # the model prefers 3 (text A) over 5 (text B)
    ranker = torch.tensor([0.2, 0.8])  # the ranker prefers text B
    p = CopyBias([[1, 3], [1, 5]], bias=4.0, weights=ranker.log().tolist())
    p.accept(1)
    got = torch.softmax(p(lm.clone(), None), 0)[[3, 5]]
    want = torch.softmax(lm[[3, 5]], 0) * ranker
    assert torch.allclose(got / got.sum(), want / want.sum(), atol=1e-6)


def test_copy_from_checks_weights():
    assert CopyFrom(("a", "b"), weights=(0.0, -1.0)).problem() is None
    assert "one number per text" in CopyFrom(("a", "b"), weights=(0.0,)).problem()
    assert "[-100, 100]" in CopyFrom(("a",), weights=(-1e9,)).problem()


def test_openai_client_copy_extra(tmp_path):
    """The ``copy`` extra through the live server and the official client: a bonus of 100 makes the random model
    quote the text; an oversized one is a 400 naming the field."""
    import openai

    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app
    from tests.serve_fixtures import LiveServer

    path, _ = text_model_dir(tmp_path / "m")
    llm = L.load(path, max_num_seqs=4)
    text = "Serving many requests at once needs continuous batching."
    with LiveServer(create_app(llm, served_model_name="tiny")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "Hello world!"}]
        out = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0,
                                        extra_body={"copy": {"texts": [text], "bias": 100, "start_bias": 100}})
        assert out.choices[0].message.content.startswith(text)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                      extra_body={"copy": {"texts": ["x"] * 300}})
        assert "copy" in str(e.value) and "x', 'x" not in str(e.value)
        # weights: the text with the larger weight is the one quoted; a weight per text, or a 400
        other = "Nothing here repeats the first text at all."
        for w, want in (([0.0, -100.0], text), ([-100.0, 0.0], other)):
            out = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0, extra_body={
                "copy": {"texts": [text, other], "bias": 50, "start_bias": 50, "weights": w}})
            assert out.choices[0].message.content.startswith(want)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                      extra_body={"copy": {"texts": ["x", "y"], "weights": [0.0]}})
        assert "weights" in str(e.value)
