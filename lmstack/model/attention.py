"""Attention contexts: where the keys and values come from, and which ones a query may see.

The Transformer computes q, k, v (after RoPE) and hands them to ``ctx.attend(layer_idx, q, k, v)``.
The context decides the rest, so one model class serves training (causal, padded batches), simple
incremental decoding (:class:`KVCache`), the serving engine's paged KV pool (``lmstack.serve``) and prefix
tuning (``lmstack.tune``) without the model importing any of them.

Shapes: q (B, n_heads, T, D); k, v (B, n_kv_heads, T, D); output (B, n_heads, T, D).
Masks follow transformers: a query at index i sees key j iff j <= i, key j is not padding, and, with a
sliding window W, i - j < W. ``sliding_window`` is one window for every layer (or None), or a tuple with each
layer's window (Gemma 3's sliding / global layers: ``ModelConfig.attention_window``).
"""

from __future__ import annotations

from typing import Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


Window = Union[int, None, Sequence[Union[int, None]]]


def window_of(sliding_window: Window, layer_idx: int) -> int | None:
    """The window of layer ``layer_idx`` from one window for all layers or a per-layer tuple."""
    if sliding_window is None or isinstance(sliding_window, int):
        return sliding_window
    return sliding_window[layer_idx]


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """scaled_dot_product_attention with grouped-query heads (k/v heads shared by n_rep query heads)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        # (B, n_kv, S, D) -> (B, n_kv * n_rep, S, D); expand+reshape is what SDPA's math path does anyway
        b, kv, s, d = k.shape
        k = k[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)
        v = v[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


def build_mask(
    q_idx: Tensor, k_idx: Tensor, key_valid: Tensor | None, sliding_window: int | None
) -> Tensor:
    """Boolean mask (B, 1, T, S): True where query i may attend key j.

    q_idx (T,) and k_idx (S,) are absolute cache indices; key_valid (B, S) marks non-padding keys.
    A query with no visible key (left padding) is allowed to see itself, so SDPA never yields NaN.
    """
    allowed = k_idx[None, :] <= q_idx[:, None]  # (T, S)
    if sliding_window is not None:
        allowed = allowed & (q_idx[:, None] - k_idx[None, :] < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    self_key = k_idx[None, :] == q_idx[:, None]
    return allowed | self_key[None, None]


class CausalContext:
    """No cache: a full sequence, causal, with an optional padding mask (B, T) and sliding window."""

    def __init__(self, attention_mask: Tensor | None = None, sliding_window: Window = None):
        self.attention_mask = attention_mask
        self.sliding_window = sliding_window
        self._masks: dict[tuple, Tensor] = {}

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T = q.shape[2]
        W = window_of(self.sliding_window, layer_idx)
        needs_window = W is not None and T > W
        if self.attention_mask is None and not needs_window:
            return sdpa(q, k, v, is_causal=True)
        key = (T, q.device, W if needs_window else None)
        mask = self._masks.get(key)
        if mask is None:  # built once per window, shared by the layers with that window
            idx = torch.arange(T, device=q.device)
            mask = self._masks[key] = build_mask(idx, idx, self.attention_mask, W if needs_window else None)
        return sdpa(q, k, v, mask)


class KVCache:
    """A contiguous, preallocated KV cache for a batch: (B, n_kv, max_len, D) per layer.

    ``attention_mask`` (B, S) marks which cached slots are real tokens (left padding is False) and grows
    as tokens are appended via :meth:`extend_mask`. Call :meth:`advance` after each forward pass.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, sliding_window: Window = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0  # number of slots already filled
        self.sliding_window = sliding_window
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self._masks: dict[int | None, Tensor] = {}  # per window, for this step

    def set_padding(self, attention_mask: Tensor) -> None:
        """Mark the padding of the tokens about to be written (B, T) at the current position."""
        T = attention_mask.shape[1]
        self.key_valid[:, self.pos:self.pos + T] = attention_mask.bool()

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T = q.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} > {self.max_len} slots")
        self.k[layer_idx][:, :, self.pos:end] = k
        self.v[layer_idx][:, :, self.pos:end] = v
        W = window_of(self.sliding_window, layer_idx)
        if layer_idx == 0:
            self._masks.clear()
        mask = self._masks.get(W)
        if mask is None:
            q_idx = torch.arange(self.pos, end, device=q.device)
            k_idx = torch.arange(end, device=q.device)
            mask = self._masks[W] = build_mask(q_idx, k_idx, self.key_valid[:, :end], W)
        return sdpa(q, self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end], mask)

    def advance(self, n: int) -> None:
        self.pos += n
        self._masks.clear()
