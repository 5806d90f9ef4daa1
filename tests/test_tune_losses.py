"""DPO, IPO and distillation losses against their published formulas on fixed numbers; SFT CE vs transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmstack.tune.batches import IGNORE
from lmstack.tune.losses import dpo_loss, kd_loss, sequence_logps, token_ce

torch.set_num_threads(2)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_equals_rafailov_formula_by_hand():
    # pairs: (policy chosen, policy rejected, reference chosen, reference rejected)
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0])
    rc, rr = torch.tensor([-1.5, -3.5]), torch.tensor([-1.8, -3.2])
    beta = 0.5
    # pair 1: h = (-1 + 1.5) - (-2 + 1.8) = 0.7; pair 2: h = (-4 + 3.5) - (-3 + 3.2) = -0.7
    expected = (-math.log(_sigmoid(0.5 * 0.7)) - math.log(_sigmoid(-0.5 * 0.7))) / 2
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert math.isclose(m["rewards_chosen"], (0.5 * 0.5 + 0.5 * -0.5) / 2, abs_tol=1e-7)
    assert math.isclose(m["reward_margin"], (0.5 * 0.7 + 0.5 * -0.7) / 2, abs_tol=1e-7)
    assert m["pref_accuracy"] == 0.5


def test_dpo_label_smoothing_and_ipo_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.8))
    h, beta, eps = 0.7, 0.1, 0.2
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = -(1 - eps) * math.log(_sigmoid(beta * h)) - eps * math.log(_sigmoid(-beta * h))
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert math.isclose(float(loss), (h - 1 / (2 * beta)) ** 2, rel_tol=1e-5)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1)
    loss.backward()
    # d/dpc of -log σ(β h) at h = 0 is -β σ(0) = -0.05
    assert math.isclose(float(pc.grad), -0.05, rel_tol=1e-6) and math.isclose(float(pr.grad), 0.05, rel_tol=1e-6)


def test_kd_loss_equals_hinton_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 4, 6, generator=g)
    t = torch.randn(1, 4, 6, generator=g)
    labels = torch.tensor([[IGNORE, 2, IGNORE, 5]])  # targets at positions 1 and 3 -> logits rows 0 and 2
    T, alpha = 2.0, 0.3
    loss, n, _ = kd_loss(s, t, labels, T, alpha)
    assert n == 2
    S, Tt = s[0].double().numpy(), t[0].double().numpy()
    total = 0.0
    for row, y in ((0, 2), (2, 5)):
        ps = np.exp(S[row] / T) / np.exp(S[row] / T).sum()
        pt = np.exp(Tt[row] / T) / np.exp(Tt[row] / T).sum()
        kl = float((pt * np.log(pt / ps)).sum())
        ce = float(-np.log(np.exp(S[row, y]) / np.exp(S[row]).sum()))
        total += alpha * T * T * kl + (1 - alpha) * ce
    assert math.isclose(float(loss), total / 2, rel_tol=1e-5)
    # a student equal to the teacher has zero KL
    loss_same, _, m = kd_loss(t, t, labels, T, 1.0)
    assert abs(float(loss_same)) < 1e-6 and abs(m["kd"]) < 1e-6


def test_token_ce_and_sequence_logps_match_transformers_loss():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    labels[1, 6] = IGNORE
    with torch.no_grad():
        out = hf(input_ids=ids, labels=labels)
        loss, n, _ = token_ce(out.logits, labels)
        torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
        assert n == 7  # row 0: targets 3..6 (4), row 1: 3..5 (3)
        lp = sequence_logps(out.logits, labels)
        logp = torch.log_softmax(out.logits, -1)
        ref0 = sum(float(logp[0, t - 1, ids[0, t]]) for t in range(3, 7))
        assert math.isclose(float(lp[0]), ref0, rel_tol=1e-5)


@pytest.mark.parametrize("wrap", ["plain", "lora", "prefix"])
def test_chunked_sft_loss_equals_full_logits_loss_and_gradients(wrap, monkeypatch):
    from lmstack.model import build_model
    from lmstack.model.config import ModelConfig
    from lmstack.tune import losses
    from lmstack.tune.lora import LoraSpec, apply_lora
    from lmstack.tune.prompt import PromptEncoder, PromptSpec, PromptTunedModel

    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build_model(cfg, device="cpu", seed=0)
    if wrap == "lora":
        apply_lora(model, LoraSpec(r=2, target_modules="all-linear"))
        torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight, std=0.1)
    if wrap == "prefix":
        model = PromptTunedModel(model, PromptEncoder(model, "prefix", PromptSpec(3)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[2, 8:] = IGNORE
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    params = [p for p in model.parameters() if p.requires_grad]

    ref, n_ref, acc_ref = token_ce(losses.forward_logits(model, batch), labels)
    ref_grads = torch.autograd.grad(ref, params)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 96 * 5)  # 5 rows per chunk: 4 chunks for 18 targets
    got, n, acc = losses.sft_token_loss(model, batch)
    grads = torch.autograd.grad(got, params)
    assert n == n_ref == 3 * 7 - 3 and acc == pytest.approx(acc_ref)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert isinstance(losses._core_model(model).lm_head, torch.nn.Linear)  # swapped back


def test_chunked_sequence_logps_equal_full_logits_and_gradients(monkeypatch):
    from lmstack.model import build_model
    from lmstack.model.config import ModelConfig
    from lmstack.tune import losses
    from lmstack.tune.lora import LoraSpec, apply_lora

    cfg = ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = build_model(cfg, device="cpu", seed=1)
    apply_lora(model, LoraSpec(r=2, target_modules=["q_proj", "down_proj"]))
    torch.nn.init.normal_(model.model.layers[0].mlp.down_proj.lora_B.weight, std=0.1)
    ids = torch.randint(0, 80, (4, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[3, :] = IGNORE  # a row with no target sums to 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    params = [p for p in model.parameters() if p.requires_grad]
    ref = sequence_logps(losses.forward_logits(model, batch), labels)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ref_g = torch.autograd.grad((ref * w).sum(), params)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 80 * 3)
    got = losses.model_sequence_logps(model, batch)
    g = torch.autograd.grad((got * w).sum(), params)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert float(got[3].detach()) == 0.0
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
