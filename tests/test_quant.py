"""Weight-only int8 / NF4 linears against the published definitions (QLoRA appendix E, absmax int8)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm

from lmstack.model import build_model
from lmstack.model.config import ModelConfig
from lmstack.quant import NF4_CODEBOOK, Int8Linear, NF4Linear, dequantize_nf4, quantize_model, quantize_nf4

torch.set_num_threads(2)


def test_nf4_codebook_is_the_qlora_construction():
    # QLoRA (Dettmers et al. 2023) / bitsandbytes create_normal_map(offset=0.9677083): 8 positive and 7
    # negative N(0,1) quantiles plus an exact zero, normalised to [-1, 1]
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    v = v / np.abs(v).max()
    np.testing.assert_allclose(NF4_CODEBOOK.numpy(), v, atol=1e-6)


def test_nf4_quantize_is_nearest_level_per_group_with_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * 0.05  # 960 weights = 15 groups of 64
    packed, absmax = quantize_nf4(w, group_size=64)
    assert packed.dtype == torch.uint8 and packed.numel() == 480 and absmax.numel() == 15
    deq = dequantize_nf4(packed, absmax, (24, 40), 64)
    # independent reference: brute-force nearest codebook level of each absmax-normalised weight
    groups = w.reshape(-1, 64)
    scale = groups.abs().amax(1, keepdim=True)
    idx = (groups[..., None] / scale[..., None] - NF4_CODEBOOK).abs().argmin(-1)
    ref = (NF4_CODEBOOK[idx] * scale).reshape(24, 40)
    torch.testing.assert_close(deq, ref, rtol=0, atol=1e-7)
    max_gap = (NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max()
    err = (w - deq).abs().reshape(-1, 64)
    assert bool((err <= scale * max_gap / 2 + 1e-7).all())
    # each group's absmax weight is represented exactly (it maps to ±1)
    top = groups.abs().argmax(1)
    torch.testing.assert_close(deq.reshape(-1, 64).gather(1, top[:, None]), groups.gather(1, top[:, None]))


def test_nf4_padding_when_size_is_not_a_group_multiple():
    w = torch.randn(3, 7)
    packed, absmax = quantize_nf4(w, group_size=8)
    assert absmax.numel() == 3  # 21 weights -> 3 groups of 8 (3 zeros of padding)
    deq = dequantize_nf4(packed, absmax, (3, 7), 8)
    assert deq.shape == (3, 7) and (w - deq).abs().max() < w.abs().max() * 0.2


def test_int8_linear_matches_absmax_formula_and_backward_uses_dequantized_weight():
    lin = torch.nn.Linear(32, 16, bias=True)
    q = Int8Linear.from_linear(lin)
    s = lin.weight.detach().abs().amax(1) / 127
    ref_w = torch.round(lin.weight.detach() / s[:, None]).clamp(-127, 127) * s[:, None]
    torch.testing.assert_close(q.dequantize(), ref_w)
    assert (ref_w - lin.weight).abs().max() <= s.max() / 2 + 1e-7
    x = torch.randn(5, 32, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ ref_w.t() + lin.bias, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ ref_w.t() + lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def test_quantize_model_keeps_logits_close_and_shrinks_weights():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg, device="cpu", seed=0)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    fp_bytes = sum(m.weight.numel() * 4 for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    n = quantize_model(model, "nf4", group_size=32)
    assert n == 14 and isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
    q_bytes = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
                  for b in m.buffers())
    assert q_bytes < fp_bytes / 6  # 4 bits + one fp32 scale per 32 weights: ~1/6.4 of fp32
    with torch.no_grad():
        out = model(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel
