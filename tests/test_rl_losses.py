"""The RL losses on fixed numbers against the published formulas, written out here in numpy one element at a
time (no vectorised shortcut shared with the code under test), and GRPO against TRL's own loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmstack.rl.losses import (AdaptiveKL, bradley_terry_loss, gae, group_advantages, grpo_loss,
                               kl_shaped_rewards, masked_whiten, ppo_policy_loss, ppo_value_loss)

RNG = np.random.default_rng(7)
B, T = 4, 6
LENS = [6, 3, 5, 1]
MASK = np.array([[1.0 if t < n else 0.0 for t in range(T)] for n in LENS])


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_with_and_without_margin():
    rc, rr = RNG.normal(size=5), RNG.normal(size=5)
    for m in (0.0, 0.7):
        want = sum(-math.log(sigmoid(rc[i] - rr[i] - m)) for i in range(5)) / 5
        loss, met = bradley_terry_loss(t(rc), t(rr), m)
        assert float(loss) == pytest.approx(want, rel=1e-6)
        assert met["accuracy"] == pytest.approx(sum(rc[i] > rr[i] for i in range(5)) / 5)


def gae_reference(r, v, lens, gamma, lam):
    """The backward recursion, one response at a time (Schulman et al. 2016, eq. 16)."""
    adv = np.zeros_like(r)
    for b, n in enumerate(lens):
        running = 0.0
        for k in reversed(range(n)):
            next_v = v[b, k + 1] if k + 1 < n else 0.0
            delta = r[b, k] + gamma * next_v - v[b, k]
            running = delta + gamma * lam * running
            adv[b, k] = running
    return adv, (adv + v) * MASK


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_the_backward_recursion(gamma, lam):
    r, v = RNG.normal(size=(B, T)) * MASK, RNG.normal(size=(B, T))
    want_a, want_r = gae_reference(r, v, LENS, gamma, lam)
    a, ret = gae(t(r), t(v), t(MASK), gamma, lam)
    np.testing.assert_allclose(a.numpy(), want_a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), want_r, rtol=1e-10, atol=1e-12)
    if gamma == 1.0 and lam == 1.0:  # Monte Carlo: the advantage is the reward-to-go minus the value
        for b, n in enumerate(LENS):
            for k in range(n):
                assert a[b, k].item() == pytest.approx(r[b, k:n].sum() - v[b, k])


def test_ppo_clipped_surrogate_and_clip_fraction():
    logp, old = RNG.normal(size=(B, T)) * 0.3 - 1, RNG.normal(size=(B, T)) * 0.3 - 1
    adv, eps = RNG.normal(size=(B, T)), 0.2
    terms, clipped = [], []
    for b in range(B):
        for k in range(LENS[b]):
            ratio = math.exp(logp[b, k] - old[b, k])
            unclipped = ratio * adv[b, k]
            clip = min(max(ratio, 1 - eps), 1 + eps) * adv[b, k]
            terms.append(-min(unclipped, clip))
            clipped.append(-clip > -unclipped)
    loss, met = ppo_policy_loss(t(logp), t(old), t(adv), t(MASK), eps)
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-9)
    assert met["clip_frac"] == pytest.approx(np.mean(clipped))


def test_ppo_clipped_value_loss():
    v, old, ret, eps = RNG.normal(size=(B, T)), RNG.normal(size=(B, T)), RNG.normal(size=(B, T)), 0.3
    terms = []
    for b in range(B):
        for k in range(LENS[b]):
            vc = old[b, k] + min(max(v[b, k] - old[b, k], -eps), eps)
            terms.append(0.5 * max((v[b, k] - ret[b, k]) ** 2, (vc - ret[b, k]) ** 2))
    loss, _ = ppo_value_loss(t(v), t(old), t(ret), t(MASK), eps)
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-9)


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    logp, ref, score, beta = RNG.normal(size=(B, T)), RNG.normal(size=(B, T)), RNG.normal(size=B), 0.05
    r, _ = kl_shaped_rewards(t(score), t(logp), t(ref), t(MASK), beta)
    for b, n in enumerate(LENS):
        for k in range(T):
            want = 0.0 if k >= n else -beta * (logp[b, k] - ref[b, k]) + (score[b] if k == n - 1 else 0.0)
            assert r[b, k].item() == pytest.approx(want, abs=1e-12)


def test_whiten_and_adaptive_kl():
    x = RNG.normal(size=(B, T)) * 3 + 2
    vals = [x[b, k] for b in range(B) for k in range(LENS[b])]
    mu, sd = np.mean(vals), np.std(vals, ddof=1)
    w = masked_whiten(t(x), t(MASK))
    for b in range(B):
        for k in range(T):
            assert w[b, k].item() == pytest.approx((x[b, k] - mu) / sd if k < LENS[b] else 0.0, rel=1e-6, abs=1e-9)
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    fixed = AdaptiveKL(0.1)
    assert fixed.update(50.0, 10) == 0.1


def test_group_advantages():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 0.0, 2.0])
    a = group_advantages(t(r), 4).numpy()
    d = group_advantages(t(r), 4, scale=False).numpy()
    for g in range(3):
        grp = r[4 * g:4 * g + 4]
        mu = sum(grp) / 4
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / 3)
        for i in range(4):
            assert a[4 * g + i] == pytest.approx((grp[i] - mu) / (sd + 1e-4))
            assert d[4 * g + i] == pytest.approx(grp[i] - mu)
    assert np.all(a[4:8] == 0)  # a group with one reward teaches nothing


def grpo_reference(logp, old, ref, adv, beta, el, eh, loss_type, max_len):
    per = np.zeros((B, T))
    for b in range(B):
        for k in range(LENS[b]):
            ratio = math.exp(logp[b, k] - old[b, k])
            obj = min(ratio * adv[b], min(max(ratio, 1 - el), 1 + eh) * adv[b])
            kl = math.exp(ref[b, k] - logp[b, k]) - (ref[b, k] - logp[b, k]) - 1
            per[b, k] = -obj + beta * kl
    if loss_type == "grpo":
        return np.mean([per[b, :LENS[b]].sum() / LENS[b] for b in range(B)])
    if loss_type == "dapo":
        return per.sum() / sum(LENS)
    return per.sum() / (B * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,eh", [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_matches_the_paper_formula(loss_type, beta, eh):
    logp = RNG.normal(size=(B, T)) * 0.2 - 1
    old, ref = logp + RNG.normal(size=(B, T)) * 0.3, logp + RNG.normal(size=(B, T)) * 0.3
    adv = RNG.normal(size=B)
    want = grpo_reference(logp, old, ref, adv, beta, 0.2, eh, loss_type, 8)
    lp = t(logp).requires_grad_(True)
    loss, met = grpo_loss(lp, t(old), t(adv), t(MASK), ref_logp=t(ref), beta=beta, eps_low=0.2, eps_high=eh,
                          loss_type=loss_type, max_len=8)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    loss.backward()
    assert lp.grad[MASK == 0].abs().sum() == 0  # padding gets no gradient


def trl_grpo_loss(logp, old, ref, adv, beta, el, eh, loss_type, max_len):
    """TRL's ``GRPOTrainer._compute_loss`` with the model forward replaced by the fixed log-probs."""
    trl = pytest.importorskip("trl")
    from collections import defaultdict

    lp = t(logp).requires_grad_(True)
    mask = t(MASK).long()

    class Acc:
        num_processes, sync_gradients = 1, True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=el, epsilon_high=eh, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), aux_loss_enabled=False,
        model=SimpleNamespace(training=False), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, accelerator=Acc(), _metrics={"train": defaultdict(list),
                                                                    "eval": defaultdict(list)},
        _entropy_bonus_enabled=False, use_adaptive_entropy=False)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": t(adv), "old_per_token_logps": t(old), "ref_per_token_logps": t(ref),
              "num_items_in_batch": mask.sum()}
    return trl.GRPOTrainer._compute_loss(fake, None, inputs).detach()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_equals_trls_on_the_same_tensors(loss_type):
    logp = RNG.normal(size=(B, T)) * 0.2 - 1
    old, ref = logp + RNG.normal(size=(B, T)) * 0.3, logp + RNG.normal(size=(B, T)) * 0.3
    adv = RNG.normal(size=B)
    theirs = trl_grpo_loss(logp, old, ref, adv, 0.04, 0.2, 0.28, loss_type, T)
    ours, _ = grpo_loss(t(logp), t(old), t(adv), t(MASK), ref_logp=t(ref), beta=0.04, eps_low=0.2, eps_high=0.28,
                        loss_type=loss_type, max_len=T)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)
