"""Model FLOPs per token and a measured matmul peak, for MFU (model FLOPs utilisation).

MFU = (model FLOPs per token x tokens/s) / peak FLOP/s, with the PaLM accounting (Chowdhery et al. 2022,
appendix B): 6 N per token for the weight matmuls (forward 2N + backward 4N; N excludes the input
embedding lookup, includes the output projection) plus 12 L H Q T for attention scores and values
(L layers, H heads, Q head dim, T sequence length). Recomputation (activation checkpointing) is not
counted: MFU measures useful work. The peak is *measured* (a large square matmul on this device and
dtype), not a datasheet number, so CPU figures mean something.
"""

from __future__ import annotations

import time

import torch
from torch import nn

_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward)."""
    from lmstack.model.config import ModelConfig

    cfg = getattr(model, "config", None)
    if isinstance(cfg, ModelConfig):
        # MoE: the parameters one token uses (its top-k experts), not all experts
        n = cfg.num_parameters(include_embeddings=False, active_only=True) + cfg.vocab_size * cfg.hidden_size
        attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
        return 6.0 * n + attn
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return 6.0 * n


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        size: int | None = None, seconds: float = 0.5) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul on this device/dtype, with the current thread count."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t_warm = time.perf_counter() + min(0.25, seconds)  # let clocks and thread pools spin up
    while time.perf_counter() < t_warm:
        a @ b
    sync()
    best = float("inf")
    t_end = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    peak = 2.0 * n**3 / best
    _PEAK_CACHE[key] = peak
    return peak
