"""Rotary position embeddings (RoPE, Su et al. 2021) and their context-extension scalings.

``rope_scaling`` (transformers' ``rope_parameters``) selects how the inverse frequencies are stretched:

- ``linear``  position interpolation (Chen et al. 2023): inv_freq / factor.
- ``llama3``  Llama-3.1's wavelength-banded interpolation (Meta 2024).
- ``yarn``    YaRN (Peng et al. 2023): a linear ramp between interpolated and extrapolated frequencies over
              the dims whose rotation count falls between ``beta_slow`` and ``beta_fast``, and cos / sin scaled
              by the attention factor ``0.1 ln(factor) + 1`` (Qwen2.5 long context, many Llama derivatives).
- ``dynamic`` dynamic NTK scaling (bloc97 / emozilla 2023): when a forward pass reaches position
              ``L > max_position_embeddings`` the base becomes
              ``theta * (factor * L / max_pos - (factor - 1)) ** (D / (D - 2))``; below it, plain RoPE.

Numerics follow ``transformers`` ``modeling_rope_utils.py`` (tests/test_model_rope.py checks logits against it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmstack.model.config import ModelConfig


def _kind(cfg: ModelConfig) -> str:
    rs = cfg.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


def _yarn_factor(cfg: ModelConfig) -> float:
    rs = cfg.rope_scaling
    f = rs.get("factor")
    return float(f) if f is not None else cfg.max_position_embeddings / rs["original_max_position_embeddings"]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (YaRN's attention temperature; 1.0 for the other types)."""
    if _kind(cfg) != "yarn":
        return 1.0
    rs = cfg.rope_scaling
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor = _yarn_factor(cfg)
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return _yarn_mscale(factor, rs["mscale"]) / _yarn_mscale(factor, rs["mscale_all_dim"])
    return _yarn_mscale(factor)


def rope_is_dynamic(cfg: ModelConfig) -> bool:
    """Whether the frequencies depend on the positions of the forward pass (dynamic NTK)."""
    return _kind(cfg) == "dynamic"


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> Tensor:
    """Inverse frequencies (D/2,) fp32. ``seq_len`` (the largest position + 1 of the forward pass) matters only
    for dynamic NTK; without it dynamic NTK gives the unscaled frequencies (exact up to max_position_embeddings)."""
    dim, theta = cfg.head_dim, cfg.rope_theta
    kind = _kind(cfg)
    rs = cfg.rope_scaling or {}
    if kind == "dynamic":
        L = max(seq_len or 0, cfg.max_position_embeddings)
        factor = float(rs["factor"])
        theta = theta * ((factor * L / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind in ("default", "dynamic"):
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        return torch.where(medium, smoothed, inv_l)
    if kind == "yarn":
        factor = _yarn_factor(cfg)
        old = rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def correction_dim(n_rot: float) -> float:  # the dim whose wavelength fits n_rot times in `old`
            return (dim * math.log(old / (n_rot * 2 * math.pi))) / (2 * math.log(cfg.rope_theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
        pos_freqs = cfg.rope_theta ** (torch.arange(0, dim, 2).float() / dim)
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    raise ValueError(f"rope type {kind!r}")  # unreachable: ModelConfig.__post_init__ checks the type
