"""The one decoder: Llama / Qwen2 / Qwen3 / Mistral / Mixtral / Qwen2-MoE / Qwen3-MoE as rows of :class:`ModelConfig`.

Module names are the Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``), so a
checkpoint loads by key copy. References: Llama (Touvron et al. 2023), GQA (Ainslie et al. 2023),
RoPE (Su et al. 2021), SwiGLU (Shazeer 2020), RMSNorm (Zhang & Sennrich 2019); numerics follow
``transformers`` ``modeling_llama.py`` / ``modeling_qwen3.py`` / ``modeling_mixtral.py`` / ``modeling_qwen2_moe.py``.
Sparse MoE feed-forward blocks live in :mod:`lmstack.model.moe`; RoPE scalings in :mod:`lmstack.model.rope`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.attention import AttentionContext, CausalContext
from lmstack.model.config import ModelConfig
from lmstack.model.moe import SparseMoE, router_losses
from lmstack.model.rope import rope_attention_factor, rope_inv_freq, rope_is_dynamic

__all__ = ["RMSNorm", "Attention", "MLP", "Block", "Transformer", "rope_inv_freq", "apply_rope", "signed_sin"]


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in fp32, cast back (weights start at zero)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Gemma's token embedding: the table row times sqrt(hidden), the factor rounded to the table's dtype."""

    def __init__(self, num: int, dim: int, scale: float):
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, input_ids: Tensor) -> Tensor:
        return super().forward(input_ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


class SoftcapLinear(nn.Linear):
    """lm_head with final-logit soft-capping (``c * tanh(logits / c)``), under the plain ``lm_head.weight`` name, so
    every caller of ``model.lm_head`` (engine, eval, scoring) gets capped logits."""

    def __init__(self, in_features: int, out_features: int, cap: float):
        super().__init__(in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(super().forward(x) / self.cap) * self.cap


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return GemmaRMSNorm(dim, cfg.rms_norm_eps) if cfg.is_gemma else RMSNorm(dim, cfg.rms_norm_eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused kernel, the same formula (x * rsqrt(mean(x^2) + eps) * w) in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def signed_sin(sin: Tensor) -> Tensor:
    """(..., D) sin -> cat(-sin[:D/2], sin[D/2:]) so that ``rotate_half(x) * sin == swap_halves(x) * signed_sin``
    exactly (negation is exact): one op fewer per rotation, once per forward instead of per layer."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin_s: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with ``sin_s = signed_sin(sin)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin_s)


def _fuse_linears(linears: list[nn.Module], column_major: bool = True) -> tuple[Tensor, Tensor | None] | None:
    """Concatenate the weights (and biases) of plain ``nn.Linear`` layers with the same input along the
    output dim, stored column-major (an (in, out) contiguous buffer, seen as (out, in)), then point each
    layer's parameter at its part of it: no extra memory, the same parameter names, shapes and values.
    Returns None (nothing changed) for wrapped layers (e.g. LoRA) or mixed bias / dtype / device.

    Why column-major: a matrix-vector product ``x @ W.T`` streams a contiguous W.T at the memory-read
    speed, while the row-major (out, in) layout runs ~25-35% slower on CPU (measured at M = 1..64; see
    docs/generation.md). ``column_major=False`` keeps the usual row-major (out, in) layout (what the compiled
    CPU decode kernel in ``lmstack.kernels`` streams)."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    ws = [m.weight for m in linears]
    has_bias = [m.bias is not None for m in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1 or len(set(has_bias)) != 1:
        return None
    with torch.no_grad():
        if column_major:
            w = torch.cat([x.detach().t() for x in ws], 1).t()  # (out_total, in), strides (1, out_total)
        else:
            w = torch.cat([x.detach() for x in ws], 0) if len(ws) > 1 else ws[0].detach().contiguous()
        b = torch.cat([m.bias.detach() for m in linears]) if has_bias[0] else None
        o = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = w[o:o + n]
            if b is not None:
                m.bias.data = b[o:o + n]
            o += n
    return w, b


def _is_fused(fused: tuple[Tensor, Tensor | None], linears: list[nn.Module]) -> bool:
    """The fused weight still backs the layers (no ``.to()``, reassignment or adapter wrapping since), and
    no gradient is wanted (training keeps the separate matmuls)."""
    if torch.is_grad_enabled() and any(m.weight.requires_grad for m in linears):
        return False
    w = fused[0]
    o = 0
    for m in linears:
        if type(m) is not nn.Linear or m.weight.data_ptr() != w.data_ptr() + o * w.stride(0) * w.element_size():
            return False
        o += m.weight.shape[0]
    return True


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, d)
            self.k_norm = make_norm(cfg, d)
        else:
            self.q_norm = self.k_norm = None
        # SDPA scales by head_dim ** -0.5; Gemma's query_pre_attn_scalar ** -0.5 is folded into q
        self.q_scale = (cfg.query_pre_attn_scalar ** -0.5 * d ** 0.5
                        if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != d else None)
        self._qkv: tuple[Tensor, Tensor | None] | None = None  # fused (weight, bias), see fuse_projections

    def fuse(self, column_major: bool = True) -> None:
        """One ((H + 2 KV) D, hidden) weight for q/k/v; the three parameters become views of it."""
        self._qkv = _fuse_linears([self.q_proj, self.k_proj, self.v_proj], column_major)

    @property
    def fused_qkv(self) -> tuple[Tensor, Tensor | None] | None:
        """(weight ((H + 2 KV) D, hidden), bias or None) that q/k/v are views of after :meth:`fuse`; else None."""
        return self._qkv

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext) -> Tensor:
        """sin is :func:`signed_sin` of the RoPE sin."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        if self._qkv is not None and _is_fused(self._qkv, [self.q_proj, self.k_proj, self.v_proj]):
            qkv = F.linear(x, *self._qkv).view(B, T, H + 2 * KV, self.head_dim)
            if self.q_norm is None and self.q_scale is None:  # rotate q and k heads together: one RoPE instead of two
                qk = apply_rope(qkv[:, :, :H + KV].transpose(1, 2), cos, sin)  # (B, H + KV, T, D)
                q, k = qk.split([H, KV], 1)
                o = ctx.attend(self.layer_idx, q, k, qkv[:, :, H + KV:].transpose(1, 2))  # (B, H, T, D)
                return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.head_dim))
            q, k, v = qkv.split([H, KV, KV], 2)
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
            k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
            v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.q_scale is not None:
            q = q * self.q_scale
        o = ctx.attend(self.layer_idx, q, k, v)  # (B, n_heads, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # silu: SwiGLU; gelu_pytorch_tanh / gelu: Gemma's GeGLU (tanh-approximated or exact GELU)
        self.act = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                    "gelu": F.gelu}[cfg.hidden_act]
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self._gate_up: tuple[Tensor, Tensor | None] | None = None  # fused (weight, None), see fuse_projections

    def fuse(self, column_major: bool = True) -> None:
        self._gate_up = _fuse_linears([self.gate_proj, self.up_proj], column_major)

    @property
    def fused_gate_up(self) -> Tensor | None:
        """The (2 * intermediate, hidden) weight that gate/up are views of after :meth:`fuse`; else None."""
        return None if self._gate_up is None else self._gate_up[0]

    def forward(self, x: Tensor) -> Tensor:
        if self._gate_up is not None and _is_fused(self._gate_up, [self.gate_proj, self.up_proj]):
            gate, up = F.linear(x, *self._gate_up).chunk(2, -1)  # (..., 2 * intermediate) -> 2 x (..., intermediate)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer. The feed-forward part is a dense SwiGLU ``mlp`` or a :class:`SparseMoE`, under the
    family's HF name (``block_sparse_moe`` for Mixtral, ``mlp`` otherwise); ``self.ffn`` names it."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.ffn_name = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
        if cfg.is_moe_layer(layer_idx):
            setattr(self, self.ffn_name, SparseMoE(cfg))
        else:
            self.ffn_name = "mlp"
            self.mlp = MLP(cfg)
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.gemma = cfg.is_gemma
        if self.gemma:  # Gemma: post_attention_layernorm norms the attention output; two more around the MLP
            self.pre_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = make_norm(cfg, cfg.hidden_size)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def fuse(self, column_major: bool = True) -> None:
        self.self_attn.fuse(column_major)
        _fuse_linears([self.self_attn.o_proj], column_major)  # layout only
        if isinstance(self.ffn, MLP):
            self.mlp.fuse(column_major)
            _fuse_linears([self.mlp.down_proj], column_major)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext) -> Tensor:
        if self.gemma:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, ctx))
            return x + self.post_feedforward_layernorm(self.ffn(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.ffn(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Holds ``embed_tokens``, ``layers`` and ``norm`` under the HF prefix ``model.``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = (ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.hidden_size ** 0.5) if cfg.is_gemma
                             else nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = (SoftcapLinear(cfg.hidden_size, cfg.vocab_size, cfg.final_logit_softcapping)
                        if cfg.final_logit_softcapping else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq: dict[tuple[torch.device, bool], Tensor] = {}
        # Gemma 3's sliding layers use their own plain RoPE (rope_local_theta); the others the config's rope
        self._local_rope = (cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None)
                            if cfg.layer_types is not None and cfg.rope_local_theta is not None else None)

    # ------------------------------------------------------------------ init
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Normal(0, initializer_range) for matrices, ones for norms (zeros for Gemma's 1 + w norms), zeros for
        biases (as transformers)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(0.0 if self.config.is_gemma else 1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(p.dtype))
        return self

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self, column_major: bool = True) -> "Transformer":
        """Inference speed-up: q/k/v and gate/up of every layer become one matmul each (33 instead of 57
        matmuls per token for an 8-layer model), and every projection weight (lm_head included) is stored
        column-major, which CPU matrix-vector products read faster. The HF-named parameters turn into
        (non-contiguous) views of the new buffers: no extra memory, ``state_dict()`` keeps its names,
        shapes and values. Layers fall back to separate matmuls whenever the views no longer back them
        (``.to()``, reassigned weights, LoRA wrappers) or gradients are enabled.

        ``column_major=False``: the same fusion with every weight row-major and contiguous, the layout the
        compiled CPU decode kernel (``lmstack.kernels``) reads."""
        for layer in self.model.layers:
            layer.fuse(column_major)
        _fuse_linears([self.lm_head], column_major)  # with tied embeddings the embedding table shares the layout
        return self

    # ------------------------------------------------------------------ forward
    def rope(self, position_ids: Tensor, dtype: torch.dtype, local: bool = False) -> tuple[Tensor, Tensor]:
        """cos, sin (B, 1, T, D) for integer positions (B, T); computed in fp32 like transformers, scaled by
        YaRN's attention factor where configured. Dynamic NTK recomputes the frequencies for a forward pass
        that reaches past max_position_embeddings (as transformers does for that pass). ``local``: the RoPE of
        Gemma 3's sliding-window layers."""
        dev = position_ids.device
        cfg = self._local_rope if local and self._local_rope is not None else self.config
        if rope_is_dynamic(cfg) and position_ids.numel() and int(position_ids.max()) + 1 > cfg.max_position_embeddings:
            inv = rope_inv_freq(cfg, int(position_ids.max()) + 1).to(dev)
        else:
            inv = self._inv_freq.get((dev, local))
            if inv is None:
                inv = self._inv_freq[(dev, local)] = rope_inv_freq(cfg).to(dev)
        freqs = position_ids[..., None].float() * inv  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        a = rope_attention_factor(cfg)
        if a != 1.0:
            cos, sin = cos * a, sin * a
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        ctx: AttentionContext | None = None,
    ) -> Tensor:
        """Final-normed hidden states (B, T, hidden)."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            else:
                position_ids = torch.arange(T, device=x.device).expand(B, T)
        if ctx is None:
            ctx = CausalContext(attention_mask, self.config.attention_window)
        cos, sin = self.rope(position_ids, x.dtype)
        sin = signed_sin(sin)
        if self._local_rope is None:
            for layer in self.model.layers:
                x = layer(x, cos, sin, ctx)
            return self.model.norm(x)
        lcos, lsin = self.rope(position_ids, x.dtype, local=True)
        lsin = signed_sin(lsin)
        for i, layer in enumerate(self.model.layers):
            local = self.config.layer_types[i] == "sliding_attention"
            x = layer(x, lcos if local else cos, lsin if local else sin, ctx)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        ctx: AttentionContext | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor:
        """Logits (B, T, vocab). ``logits_to_keep=n`` computes only the last n positions (decoding).

        attention_mask (B, T): 1 for tokens, 0 for padding (used when no ``ctx`` is given).
        ctx: an :class:`AttentionContext` (a KV cache, the serving engine's paged cache, a prefix).
        """
        h = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                               attention_mask=attention_mask, ctx=ctx)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    # ------------------------------------------------------------------ MoE training losses
    def router_losses(self, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """After a training forward of an MoE model: ``{"aux": weighted load-balancing + z-loss, ...}`` to add
        to the LM loss (``loss + out["aux"]``); an empty dict for a dense model. See :mod:`lmstack.model.moe`."""
        return router_losses(self, attention_mask)

    # ------------------------------------------------------------------ info
    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
