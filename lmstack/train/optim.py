"""AdamW with weight-decay groups, and learning-rate schedules as pure functions of the step.

* Decoupled weight decay: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
  Matrices (ndim >= 2: linear weights, embeddings) decay; norms, biases and other 1-D params do not
  (nanoGPT's ``configure_optimizers``).
* Cosine with linear warmup: Loshchilov & Hutter, "SGDR" (2017); the GPT-3 / nanoGPT variant decays to
  ``min_lr`` at the last step.
* Warmup-stable-decay (WSD): Hu et al., "MiniCPM" (2024) and Hägele et al., "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations" (2024): constant lr, then a final
  ``decay_fraction`` of the run decays with the 1 - sqrt shape they found best.

The schedule has no state beyond the step counter, so resuming restores it exactly.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from lmstack.train.config import TrainConfig


def param_groups(model: nn.Module, params: Iterable[nn.Parameter] | None, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay (ndim >= 2) and no-decay (ndim < 2). Tied parameters appear once."""
    wanted = None if params is None else {id(p) for p in params}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad or (wanted is not None and id(p) not in wanted):
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    if wanted is not None and len(seen) < len(wanted):
        # parameters that are not the model's (e.g. a learned prompt kept outside): train them, no decay
        extra = [p for p in params if id(p) not in seen]  # type: ignore[union-attr]
        no_decay.extend(extra)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, params: Iterable[nn.Parameter] | None = None,
                    device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW; ``cfg.fused="auto"`` takes the fused kernel (CPU and CUDA in torch >= 2.4), else foreach."""
    groups = param_groups(model, params, cfg.weight_decay)
    if not groups:
        from lmstack.errors import ConfigError

        raise ConfigError("no parameter requires grad: nothing to train (did an adapter freeze everything?)")
    kw: dict = {}
    if cfg.fused in ("auto", "fused"):
        kw["fused"] = True
    elif cfg.fused == "foreach":
        kw["foreach"] = True
    else:
        kw["foreach"] = False
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)
    except (RuntimeError, ValueError):
        if cfg.fused != "auto":
            raise
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``cfg.steps``."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    total, warm = cfg.steps, cfg.warmup_steps
    if warm and step < warm:
        return peak * (step + 1) / (warm + 1)
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total - 1 - warm)
        t = min(1.0, (step - warm) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "linear":
        span = max(1, total - 1 - warm)
        t = min(1.0, (step - warm) / span)
        return peak + (floor - peak) * t
    # wsd: stable at peak, then 1 - sqrt decay over the last decay_fraction of the steps
    decay_steps = max(1, round(cfg.decay_fraction * total))
    start = max(warm, total - decay_steps)
    if step < start:
        return peak
    t = min(1.0, (step - start) / max(1, total - 1 - start))
    return floor + (peak - floor) * (1.0 - math.sqrt(t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
