"""The losses of reinforcement learning from feedback, as plain tensor functions on fixed shapes.

Shapes: ``B`` responses, ``T`` response tokens (right-padded); ``mask`` (B, T) is 1 on real response tokens.

* Reward model, Bradley-Terry (Ouyang et al. 2022, "InstructGPT", eq. 1; margin: Touvron et al. 2023,
  "Llama 2", eq. 2): ``L = -log σ(r(x, y_w) - r(x, y_l) - m)``.
* GAE (Schulman et al. 2016, eq. 16): ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = δ_t + γλ A_{t+1}``, with
  ``V`` past the last response token taken as 0 (the episode ends there); returns ``R_t = A_t + V_t``.
* PPO (Schulman et al. 2017, eq. 7): ``ρ = exp(log π - log π_old)``,
  ``L = E[max(-A ρ, -A clip(ρ, 1-ε, 1+ε))]``; clipped value loss (the PPO2 / OpenAI baselines form,
  Ziegler et al. 2019): ``½ E[max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²)]``.
* Per-token KL penalty of RLHF (Ziegler et al. 2019; Stiennon et al. 2020): the reward at token t is
  ``-β (log π_old - log π_ref)``, plus the score of the whole response at its last token; the adaptive β
  controller of Ziegler et al. 2019 (section 2.2).
* GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3 and 4): per group of G responses to one prompt,
  ``A_i = (r_i - mean(r)) / std(r)`` on every token of response i; the clipped ratio objective plus
  ``β·D_KL`` with the unbiased estimator ``π_ref/π - log(π_ref/π) - 1`` (Schulman's k3). Aggregation:
  ``grpo`` = the mean over each response's tokens, then over responses (the paper); ``dapo`` = one mean over
  all tokens of the batch (Yu et al. 2025, "DAPO", eq. 8, which also clips with ε_low ≠ ε_high);
  ``dr_grpo`` = the sum over tokens / (B · max response length), and advantages not divided by the std
  (Liu et al. 2025, "Understanding R1-Zero-like training").

Every function here is checked against the formulas written out in numpy in tests/test_rl_losses.py (and,
for GRPO, against TRL's ``GRPOTrainer._compute_loss`` on the same tensors).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

GRPOLossType = Literal["grpo", "dapo", "dr_grpo"]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased variance, as TRL's PPO); padding
    positions come back as 0."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp_min(1.0)
    var = (((x - mean) ** 2) * m).sum() / (n - 1).clamp_min(1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --------------------------------------------------------------------------------------------- reward model
def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0
                       ) -> tuple[Tensor, dict[str, float]]:
    """Scalar rewards (B,) of the preferred and the other response -> mean loss and metrics
    (``accuracy``: the fraction with r_chosen > r_rejected; ``margin``: mean r_chosen - r_rejected)."""
    diff = r_chosen.float() - r_rejected.float()
    loss = -F.logsigmoid(diff - margin).mean()
    d = diff.detach()
    return loss, {"accuracy": float((d > 0).float().mean()), "margin": float(d.mean()),
                  "reward_chosen": float(r_chosen.detach().float().mean()),
                  "reward_rejected": float(r_rejected.detach().float().mean())}


# --------------------------------------------------------------------------------------------- PPO
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over right-padded responses: (advantages, returns), each (B, T)."""
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = rewards.new_zeros(B)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * m[:, t + 1] if t + 1 < T else rewards.new_zeros(B)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def kl_shaped_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float
                      ) -> tuple[Tensor, Tensor]:
    """Per-token rewards (B, T) of RLHF: ``-β (log π - log π_ref)`` on every response token, plus ``score``
    (B,) at each response's last token. Also returns the per-token KL estimate (B, T) (zero on padding)."""
    m = mask.to(logp.dtype)
    kl = (logp - ref_logp) * m
    rewards = -kl_coef * kl
    last = (m.sum(1).long() - 1).clamp_min(0)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], score.to(rewards.dtype)[:, None])
    return rewards, kl


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
                    ) -> tuple[Tensor, dict[str, float]]:
    """The clipped surrogate, a mean over response tokens; metrics: clip fraction and approximate KL."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, {"clip_frac": float(clipfrac), "approx_kl": float(approx_kl)}


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
                   ) -> tuple[Tensor, dict[str, float]]:
    """``½ E[max((V - R)², (V_clipped - R)²)]`` over response tokens; metric: value clip fraction."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, {"value_clip_frac": float(vf_clipfrac)}


class AdaptiveKL:
    """Ziegler et al. 2019, section 2.2: ``e = clip(KL / target - 1, ±0.2)``, ``β ← β (1 + e · n / horizon)``
    after each batch of ``n`` responses. ``target=None``: a fixed β."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target is not None and math.isfinite(kl):
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n / self.horizon
        return self.value


# --------------------------------------------------------------------------------------------- GRPO
def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Rewards (N·G,) in groups of ``group_size`` consecutive responses -> advantages (N·G,):
    ``r - mean(group)``, divided by the group's (unbiased) std + eps when ``scale`` (Dr. GRPO: not)."""
    r = rewards.view(-1, group_size).float()
    a = r - r.mean(1, keepdim=True)
    if scale:
        a = a / (r.std(1, keepdim=True) + eps)
    return a.reshape(-1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The per-token KL estimator of the GRPO paper: ``π_ref/π - log(π_ref/π) - 1`` (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              ref_logp: Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = None, loss_type: GRPOLossType = "grpo",
              max_len: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """The GRPO objective (to minimise) over (B, T) response tokens with advantages (B,) per response."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / m.sum().clamp_min(1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    else:
        raise ValueError(f"loss_type {loss_type!r}; expected grpo, dapo or dr_grpo")
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (a < 0)
        high = (ratio > 1 + eps_high) & (a > 0)
        metrics = {"clip_frac": float(masked_mean((low | high).float(), mask))}
        if kl is not None:
            metrics["kl"] = float(masked_mean(kl, mask))
    return loss, metrics
