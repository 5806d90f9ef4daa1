"""Green-list watermark (Kirchenbauer et al. 2023): the z-score against the published formula on fixed numbers,
the processor's bias, text generated with it by a tiny lmstack model detected and plain samples not, at the
stated false-positive rate; and the engine-shaped adapter (call, then accept) gives the same tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.guard.watermark import (
    WatermarkProcessor, detect, false_positive_rate, green_list, green_size, watermark_factory, z_score,
)

V = 96


def test_z_score_published_formula_on_fixed_numbers():
    # z = (|s|_G - gamma T) / sqrt(T gamma (1 - gamma))
    assert z_score(60, 100, 0.25) == pytest.approx((60 - 25) / math.sqrt(100 * 0.25 * 0.75))
    assert z_score(60, 100, 0.25) == pytest.approx(8.082903768654761)
    assert z_score(25, 100, 0.25) == 0.0
    assert z_score(10, 200, 0.5) == pytest.approx((10 - 100) / math.sqrt(50))
    assert false_positive_rate(4.0) == pytest.approx(3.167124183311998e-05)  # 1 - Phi(4)


def test_detect_counts_green_tokens_exactly():
    ids = [5, 17, 3, 3, 80, 41, 9]
    greens = sum(t in set(green_list(p, V, 0.25, 7).tolist()) for p, t in zip(ids[:-1], ids[1:]))
    d = detect(ids, V, gamma=0.25, key=7)
    assert d.green == greens and d.scored == len(ids) - 1
    assert d.z == pytest.approx(z_score(greens, 6, 0.25), abs=1e-4)


def test_green_list_size_determinism_and_bias():
    g = green_list(11, V, 0.25, 123)
    assert len(g) == green_size(V, 0.25) == 24 and len(set(g.tolist())) == 24
    assert torch.equal(g, green_list(11, V, 0.25, 123)) and not torch.equal(g, green_list(12, V, 0.25, 123))
    p = WatermarkProcessor(V, gamma=0.25, delta=2.0, key=123)
    row = torch.randn(V)
    out = p([4, 11], row)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[g] = True
    torch.testing.assert_close(out[mask], row[mask] + 2.0)
    torch.testing.assert_close(out[~mask], row[~mask])


def _sample(model, prompt, n, processors, seed):
    """A plain sampling loop (temperature 1): processors see (token ids so far, logits row)."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([ids]))[0, -1].float()
            for proc in processors:
                row = proc(out, row)
            tok = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
            ids.append(tok)
            out.append(tok)
    return out


@pytest.fixture(scope="module")
def model():
    from lmstack.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    return Transformer(cfg).init_weights(0).eval()


def test_watermarked_generation_detected_plain_not(model):
    prompt = [1, 2, 3]
    wm = WatermarkProcessor(V, gamma=0.25, delta=4.0, key=99, prompt_last=prompt[-1])
    for seed in range(3):
        marked = _sample(model, prompt, 80, [wm], seed)
        d = detect(marked, V, gamma=0.25, key=99, prompt_last=prompt[-1])
        assert d.watermarked and d.z > 6, d
        plain = _sample(model, prompt, 80, [], seed)
        assert not detect(plain, V, gamma=0.25, key=99, prompt_last=prompt[-1]).watermarked
        # the right text with the wrong key reads as unmarked
        assert not detect(marked, V, gamma=0.25, key=100, prompt_last=prompt[-1]).watermarked


def test_false_positive_rate_on_unwatermarked_sequences():
    """Uniform random sequences: z is ~N(0, 1); none of 300 reaches z = 4 (expected 300 * 3.2e-5 = 0.01)."""
    g = torch.Generator().manual_seed(0)
    zs = [detect(torch.randint(0, V, (120,), generator=g).tolist(), V, gamma=0.25, key=5).z for _ in range(300)]
    mean = sum(zs) / len(zs)
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / (len(zs) - 1))
    assert abs(mean) < 0.25 and 0.75 < sd < 1.25
    assert max(zs) < 4.0


def test_engine_adapter_call_then_accept_matches_processor(model):
    prompt = [7, 8]
    make = watermark_factory(V, gamma=0.25, delta=4.0, key=3, prompt_last=prompt[-1])
    proc = make()
    assert proc.satisfied is None and make() is not proc  # a fresh state per sequence
    g = torch.Generator().manual_seed(1)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(40):  # the engine's protocol: row = proc(row, seq); sample; proc.accept(token)
            row = proc(model(torch.tensor([ids]))[0, -1].float(), None)
            tok = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
            proc.accept(tok)
            ids.append(tok)
            out.append(tok)
    ref = _sample(model, prompt, 40, [WatermarkProcessor(V, 0.25, 4.0, 3, prompt[-1])], 1)
    assert out == ref
    assert detect(out, V, gamma=0.25, key=3, prompt_last=prompt[-1]).watermarked


def test_cli_watermark_detect(capsys):
    from lmstack.cli import main

    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    assert main(["guard", "watermark-detect", "--ids", ",".join(map(str, ids)), "--vocab-size", str(V), "--key", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["z"] == pytest.approx(detect(ids, V, key=5).z) and out["false_positive_rate"] == pytest.approx(3.1671e-5, rel=1e-3)
    assert main(["guard", "watermark-detect", "--ids", "1,200", "--vocab-size", str(V)]) == 2
    assert "token ids must be in" in capsys.readouterr().err


def test_watermark_through_lmstack_engine(model):
    """The adapter as a SamplingParams logits-processor factory: text sampled by lmstack's engine carries the
    watermark; the same request without it does not."""
    from lmstack.serve.llm import LLM

    llm = LLM(model, None, max_num_seqs=2)
    prompt = [5, 6, 7]
    fac = watermark_factory(V, gamma=0.25, delta=4.0, key=11, prompt_last=prompt[-1])
    kw = dict(temperature=1.0, seed=3, max_tokens=80, ignore_eos=True)
    marked = llm.generate([prompt], logits_processors=[fac], **kw)[0].outputs[0].token_ids
    plain = llm.generate([prompt], **kw)[0].outputs[0].token_ids
    assert len(marked) == 80 and marked != plain
    assert detect(marked, V, gamma=0.25, key=11, prompt_last=prompt[-1]).z > 6
    assert not detect(plain, V, gamma=0.25, key=11, prompt_last=prompt[-1]).watermarked
