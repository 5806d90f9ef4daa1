"""Prompt tuning and prefix tuning: learned virtual tokens in front of every sequence.

* Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
  P learned input embeddings ``prompt_embeddings`` (P, hidden) are prepended to the token embeddings.
* Prefix tuning / P-Tuning v2 (Li & Liang 2021; Liu et al. 2022): learned keys and values in *every*
  layer, ``prompt_embeddings`` (P, n_layers * 2 * n_kv_heads * head_dim), PEFT's layout: row p viewed as
  (n_layers * 2, n_kv_heads, head_dim), entry 2l is layer l's key, 2l+1 its value. The keys are used as
  they are (no RoPE is applied to them), as PEFT injects them into the transformers cache.

Position convention (both methods, as PEFT): the P virtual slots take positions 0..P-1, a sequence's real
tokens take positions P, P+1, ... . Serving uses the same convention through :class:`PrefixContext` with
``prefix_kv`` from :func:`prefix_kv_for` (see ``lmstack.tune.adapters``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmstack.errors import ConfigError
from lmstack.model.attention import Window, build_mask, sdpa, window_of
from lmstack.model.transformer import Transformer

PROMPT_METHODS = ("prompt", "prefix")


@dataclass
class PromptSpec:
    num_virtual_tokens: int = 20
    init: str = "vocab"  # "vocab": copy (prompt) / encode (prefix) randomly sampled vocabulary tokens; "random"


class PrefixContext:
    """Attention with ``P`` prefix slots in front of the batch's own keys.

    prefix_kv: per layer (k, v), each (n_kv, P, D) or (B, n_kv, P, D). attention_mask (B, T) marks real
    tokens (1) and padding (0) of the current sequence; prefix slots are always visible."""

    def __init__(self, prefix_kv: list[tuple[Tensor, Tensor]], attention_mask: Tensor | None = None,
                 sliding_window: Window = None):
        self.prefix_kv = prefix_kv
        self.P = prefix_kv[0][0].shape[-2]
        self.attention_mask = attention_mask
        self.sliding_window = sliding_window
        self._masks: dict[tuple, Tensor] = {}

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, _, T, _ = q.shape  # q (B, n_heads, T, D)
        pk, pv = self.prefix_kv[layer_idx]
        if pk.dim() == 3:
            pk, pv = pk[None], pv[None]
        pk = pk.to(k.dtype).expand(B, -1, -1, -1)  # (B, n_kv, P, D)
        pv = pv.to(v.dtype).expand(B, -1, -1, -1)
        k = torch.cat([pk, k], dim=2)  # (B, n_kv, P + T, D)
        v = torch.cat([pv, v], dim=2)
        W = window_of(self.sliding_window, layer_idx)
        key = (B, T, q.device, W)
        mask = self._masks.get(key)
        if mask is None:
            P = self.P
            q_idx = torch.arange(P, P + T, device=q.device)
            k_idx = torch.arange(P + T, device=q.device)
            valid = None
            if self.attention_mask is not None:
                valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device),
                                   self.attention_mask.bool()], dim=1)  # (B, P + T)
            mask = self._masks[key] = build_mask(q_idx, k_idx, valid, W)
        return sdpa(q, k, v, mask)


class _RecordingContext:
    """Causal attention that also records each layer's (k, v) (B, n_kv, T, D)."""

    def __init__(self) -> None:
        self.kv: list[tuple[Tensor, Tensor]] = []

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.kv.append((k, v))
        return sdpa(q, k, v, is_causal=True)


def encode_kv(model: Transformer, inputs_embeds: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Run ``inputs_embeds`` (1, P, hidden) at positions 0..P-1; per layer (k, v) (n_kv, P, D), RoPE applied.

    A causal prefix's keys and values do not depend on what follows it, so this is exactly what the
    virtual tokens contribute to every later forward pass."""
    ctx = _RecordingContext()
    model.hidden_states(inputs_embeds=inputs_embeds, ctx=ctx)
    return [(k[0], v[0]) for k, v in ctx.kv]


def _sample_vocab(model: Transformer, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n,), generator=g)


class PromptEncoder(nn.Module):
    """Holds ``prompt_embeddings`` for either method, in PEFT's saved layout."""

    def __init__(self, model: Transformer, method: str, spec: PromptSpec, seed: int = 0):
        super().__init__()
        if method not in PROMPT_METHODS:
            raise ConfigError(f"prompt method {method!r}; supported: {', '.join(PROMPT_METHODS)}")
        if spec.num_virtual_tokens <= 0:
            raise ConfigError(f"prompt.num_virtual_tokens must be positive, got {spec.num_virtual_tokens}")
        cfg = model.config
        self.method = method
        self.P = spec.num_virtual_tokens
        self.n_layers, self.n_kv, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        dev, dt = model.device, model.dtype
        with torch.no_grad():
            if spec.init == "vocab":
                ids = _sample_vocab(model, self.P, seed).to(dev)
                emb = model.model.embed_tokens(ids)  # (P, hidden)
                if method == "prompt":
                    init = emb.clone()
                else:  # the base model's own k/v for sampled tokens: realistic scale (Li & Liang §7)
                    kv = encode_kv(model, emb[None])
                    init = self._pack(kv)
            elif spec.init == "random":
                width = cfg.hidden_size if method == "prompt" else self.n_layers * 2 * self.n_kv * self.head_dim
                g = torch.Generator().manual_seed(seed)
                init = (torch.randn(self.P, width, generator=g) * cfg.initializer_range).to(dev, dt)
            else:
                raise ConfigError(f"prompt.init {spec.init!r}; supported: vocab, random")
        self.prompt_embeddings = nn.Parameter(init.detach().to(dev, dt))

    def _pack(self, kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        """per-layer (n_kv, P, D) pairs -> (P, L * 2 * n_kv * D) (PEFT's layout)."""
        stacked = torch.stack([t for pair in kv for t in pair])  # (L*2, n_kv, P, D)
        return stacked.permute(2, 0, 1, 3).reshape(self.P, -1)

    def prefix_kv(self, model: Transformer) -> list[tuple[Tensor, Tensor]]:
        """Per layer (k, v), each (n_kv, P, D): the contract of ``lmstack.tune.adapters.AdapterRuntime``."""
        if self.method == "prompt":
            return encode_kv(model, self.prompt_embeddings[None].to(model.dtype))
        x = self.prompt_embeddings.view(self.P, self.n_layers * 2, self.n_kv, self.head_dim)
        x = x.permute(1, 2, 0, 3)  # (L*2, n_kv, P, D)
        return [(x[2 * i], x[2 * i + 1]) for i in range(self.n_layers)]


class PromptTunedModel(nn.Module):
    """A frozen base model plus a :class:`PromptEncoder`; ``forward`` returns logits of the real tokens.

    input_ids (B, T), attention_mask (B, T) (right padding) -> logits (B, T, vocab)."""

    def __init__(self, base: Transformer, encoder: PromptEncoder):
        super().__init__()
        self.base = base
        self.encoder = encoder
        self.config = base.config
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, **_: object) -> Tensor:
        B, T = input_ids.shape
        P = self.encoder.P
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        if self.encoder.method == "prompt":
            emb = self.base.model.embed_tokens(input_ids)  # (B, T, hidden)
            prompt = self.encoder.prompt_embeddings.to(emb.dtype)[None].expand(B, -1, -1)  # (B, P, hidden)
            mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)  # (B, P + T)
            logits = self.base(inputs_embeds=torch.cat([prompt, emb], dim=1), attention_mask=mask)
            return logits[:, P:]
        positions = P + (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T): P, P+1, ...
        ctx = PrefixContext(self.encoder.prefix_kv(self.base), attention_mask, self.base.config.attention_window)
        return self.base(input_ids, position_ids=positions, ctx=ctx)

    @property
    def model(self) -> nn.Module:
        """The base's decoder (``embed_tokens``, ``layers``): what activation checkpointing and FLOP
        counting look for; not a registered submodule, so state-dict keys stay ``base.*`` / ``encoder.*``."""
        return self.base.model

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype
