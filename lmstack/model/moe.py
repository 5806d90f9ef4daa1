"""Sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE as rows of ModelConfig).

Each token's router logits pick ``k = num_experts_per_tok`` of ``num_experts`` SwiGLU experts:
``p = softmax(x W_g)``, keep the top-k, renormalise them when ``norm_topk_prob`` (Mixtral always does; Qwen
follows its config), ``y = sum_k p_k E_k(x)``. Qwen2-MoE adds a shared expert that every token uses, scaled by
``sigmoid(x w_s)``. Dispatch is dropless and capacity-free: the (token, slot) pairs are sorted by expert, each
expert runs one matmul over its contiguous group, and ``index_add_`` scatters the weighted results back — a loop
over experts, never over tokens (benchmarks/moe.py times it against a per-token loop).

Training losses (summed over the MoE layers by :func:`router_losses`):

- load balancing (Switch Transformer, Fedus et al. 2021; Mixtral's form in transformers):
  ``E * sum_e f_e P_e`` with ``f_e`` the fraction of top-k slots routed to e and ``P_e`` the mean router
  probability of e, over all layers' tokens together;
- router z-loss (ST-MoE, Zoph et al. 2022): ``mean(logsumexp(logits)^2)``, keeps router logits small.

Parameter names are the Hub's: Mixtral ``block_sparse_moe.gate`` / ``experts.N.w1|w2|w3``; Qwen
``mlp.gate`` / ``mlp.experts.N.gate_proj|up_proj|down_proj`` / ``mlp.shared_expert`` / ``mlp.shared_expert_gate``,
so a checkpoint loads by key copy and LoRA targets expert projections by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.config import ModelConfig


class MixtralExpert(nn.Module):
    """Mixtral's expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class QwenExpert(nn.Module):
    """Qwen's expert (and shared expert): down(silu(gate x) * up x)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Router logits (N, E) -> (weights (N, k) fp32, expert ids (N, k)): softmax over all experts, then top-k."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def dispatch(x: Tensor, weights: Tensor, idx: Tensor, experts: nn.ModuleList) -> Tensor:
    """Sorted, grouped expert computation. x (N, H); weights, idx (N, k) -> (N, H).

    The N*k (token, slot) pairs are sorted by expert id; expert e processes rows [off_e, off_e + n_e) of the
    gathered inputs in one call. One host sync (the group sizes), E expert calls, one scatter-add."""
    N, H = x.shape
    k = idx.shape[1]
    flat = idx.reshape(-1)  # (N k,)
    order = torch.argsort(flat, stable=True)  # (N k,) slots grouped by expert
    token = order // k  # the token each sorted slot belongs to
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    xs = x[token]  # (N k, H) gathered inputs, grouped by expert
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            outs.append(experts[e](xs[start:start + n]))
            start += n
    ys = torch.cat(outs, 0) if outs else xs.new_zeros(0, H)  # (N k, H)
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


def dispatch_loop(x: Tensor, weights: Tensor, idx: Tensor, experts: nn.ModuleList) -> Tensor:
    """The naive reference: a Python loop over tokens and their k slots (benchmarks/moe.py's baseline)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            out[t] += weights[t, j].to(x.dtype) * experts[int(idx[t, j])](x[t:t + 1])[0]
    return out


class SparseMoE(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert). Keeps the last router logits (N, E) in
    ``router_logits`` while training (or when ``keep_router_logits``) for :func:`router_losses`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, e = cfg.hidden_size, cfg.num_experts
        expert = MixtralExpert if cfg.model_type == "mixtral" else QwenExpert
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.jitter = cfg.router_jitter_noise
        self.aux_coef, self.z_coef = cfg.router_aux_loss_coef, cfg.router_z_loss_coef
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(expert(h, cfg.moe_intermediate_size) for _ in range(e))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = QwenExpert(h, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.keep_router_logits = False
        self.router_logits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, T, H = x.shape
        if self.training and self.jitter > 0:  # Mixtral: multiplicative noise on the block's input
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        flat = x.reshape(-1, H)  # (N, H)
        logits = self.gate(flat)  # (N, E)
        self.router_logits = logits if (self.training or self.keep_router_logits) else None
        w, idx = route(logits, self.top_k, self.normalize)
        y = dispatch(flat, w, idx, self.experts)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return y.view(B, T, H)


def load_balancing_loss(router_logits: list[Tensor], num_experts: int, top_k: int,
                        attention_mask: Tensor | None = None) -> Tensor:
    """Switch / Mixtral auxiliary loss over all layers' router logits (each (N, E), N = B*T).

    ``num_experts * sum_{slot, e} f_{slot,e} * P_e`` where f is the fraction of tokens whose top-k slot picks e
    and P_e the mean router probability; padding tokens (attention_mask 0) are left out."""
    logits = torch.cat([g.float() for g in router_logits], 0)  # (L N, E)
    probs = torch.softmax(logits, -1)
    _, sel = torch.topk(probs, top_k, -1)
    mask = F.one_hot(sel, num_experts).float()  # (L N, k, E)
    if attention_mask is None:
        f = mask.mean(0)  # (k, E)
        P = probs.mean(0)  # (E,)
    else:
        valid = attention_mask.reshape(-1).float().repeat(len(router_logits))  # (L N,)
        f = (mask * valid[:, None, None]).sum(0) / valid.sum()
        P = (probs * valid[:, None]).sum(0) / valid.sum()
    return (f * P[None]).sum() * num_experts


def z_loss(router_logits: list[Tensor]) -> Tensor:
    """ST-MoE router z-loss: mean over tokens (and layers) of logsumexp(logits)^2."""
    logits = torch.cat([g.float() for g in router_logits], 0)
    return torch.logsumexp(logits, -1).pow(2).mean()


def moe_blocks(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def router_losses(model: nn.Module, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """After a training forward: ``{"aux": coef * load_balancing + z_coef * z, "load_balancing", "z"}``
    from the router logits the MoE blocks kept (empty dict for a dense model). Works through DDP / FSDP /
    compile wrappers: it finds the blocks among ``model.modules()``."""
    blocks = [b for b in moe_blocks(model) if b.router_logits is not None]
    if not blocks:
        return {}
    logits = [b.router_logits for b in blocks]
    b0 = blocks[0]
    lb = load_balancing_loss(logits, len(b0.experts), b0.top_k, attention_mask)
    z = z_loss(logits)
    return {"aux": b0.aux_coef * lb + b0.z_coef * z, "load_balancing": lb, "z": z}


def expert_utilization(model: nn.Module) -> Tensor:
    """(n_moe_layers, E) fraction of top-k slots each expert received in the last kept forward."""
    rows = []
    for b in moe_blocks(model):
        if b.router_logits is None:
            continue
        _, idx = torch.topk(b.router_logits.float(), b.top_k, -1)
        rows.append(torch.bincount(idx.reshape(-1), minlength=len(b.experts)).float() / idx.numel())
    return torch.stack(rows) if rows else torch.zeros(0)
