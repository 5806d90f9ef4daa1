"""Tensor parallelism for the decoder through PyTorch DTensor (``torch.distributed.tensor.parallel``).

Megatron-LM's layout (Shoeybi et al. 2019), expressed as a ``parallelize_module`` plan per block:

- attention: ``q_proj`` / ``k_proj`` / ``v_proj`` column-parallel (each rank computes ``heads / tp`` query heads
  and ``kv_heads / tp`` key/value heads), ``o_proj`` row-parallel (one all-reduce per block output);
- SwiGLU MLP: ``gate_proj`` / ``up_proj`` column-parallel, ``down_proj`` row-parallel;
- ``embed_tokens``: vocab-parallel (row-parallel ``nn.Embedding``: each rank holds ``vocab / tp`` rows, looks up
  the ids it owns and the partial embeddings are summed);
- ``lm_head``: column-parallel with the logits left sharded over the vocabulary, for
  :func:`torch.distributed.tensor.parallel.loss_parallel` (the cross-entropy is computed without gathering the
  ``(B, T, vocab)`` logits); ``gather_logits=True`` returns ordinary replicated logits (inference);
- norms, routers and MoE experts stay replicated (their inputs are replicated, so their gradients are equal on
  every rank) -- except the per-head ``q_norm`` / ``k_norm`` of Qwen3, which see only the rank's heads: their
  gradients are summed over the tensor-parallel group by a hook.

Tied embeddings stay tied: the embedding and ``lm_head`` weights have the same placement (``Shard(0)`` over the
vocabulary), so after parallelizing both the head points at the embedding's DTensor again.

Composed with FSDP2 on a 2-D ``(dp, tp)`` mesh by :func:`lmstack.train.distributed.wrap`: TP inside each row
of ``tp`` ranks, then ``fully_shard`` over the ``dp`` dimension (torchtitan's order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmstack.errors import ConfigError


COLWISE, ROWWISE = "colwise", "rowwise"


def block_plan(block: nn.Module) -> dict[str, str]:
    """The one definition of which linears of a decoder block are split how (Megatron-LM): q/k/v and gate/up
    column-parallel (output features, i.e. heads / intermediate channels, split over the ranks), o_proj and
    down_proj row-parallel (input features split; the partial outputs are summed by one all-reduce). MoE blocks
    keep their experts replicated. Used by :func:`parallelize` (training, DTensor) and by the serving engine's
    tensor parallelism (:mod:`lmstack.serve.tp`, plain sliced weights)."""
    plan = {"self_attn.q_proj": COLWISE, "self_attn.k_proj": COLWISE, "self_attn.v_proj": COLWISE,
            "self_attn.o_proj": ROWWISE}
    if type(block.ffn).__name__ == "MLP":
        plan.update({"mlp.gate_proj": COLWISE, "mlp.up_proj": COLWISE, "mlp.down_proj": ROWWISE})
    return plan


def check_tp(cfg: Any, tp: int, hint: str = "pick train.tp_size dividing them") -> None:
    """Refuse, with one line, a model whose heads or vocabulary do not split over ``tp`` ranks."""
    if tp <= 1:
        return
    problems = []
    for name in ("num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size"):
        v = getattr(cfg, name, None)
        if v is not None and v % tp:
            problems.append(f"{name}={v}")
    if problems:
        raise ConfigError(f"tensor parallelism over {tp} ranks needs these to be divisible by {tp}: "
                          f"{', '.join(problems)}; {hint}")


def parallelize(model: nn.Module, tp_mesh, *, gather_logits: bool = False) -> nn.Module:
    """Shard an lmstack :class:`~lmstack.model.Transformer` over the 1-D device mesh ``tp_mesh`` in place.

    All ranks must hold the same full weights when this is called (same seed, or the same checkpoint);
    the shards are cut from rank 0's copy. Returns ``model``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    cfg = model.config
    check_tp(cfg, tp)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head = (ColwiseParallel(output_layouts=Replicate()) if gather_logits
            else ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": head,
    })
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    group = tp_mesh.get_group()
    styles = {COLWISE: ColwiseParallel, ROWWISE: RowwiseParallel}
    for block in model.model.layers:
        attn = block.self_attn
        parallelize_module(block, tp_mesh, {name: styles[kind]() for name, kind in block_plan(block).items()})
        attn.n_heads //= tp  # the module now computes its local heads
        attn.n_kv //= tp
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                norm.weight.register_hook(_sum_over(group))
    model._lmstack_tp = tp
    return model


def _sum_over(group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def loss_context(model: nn.Module):
    """``loss_parallel()`` around the forward *and* backward of a model whose logits are vocab-sharded."""
    import contextlib

    if getattr(model, "_lmstack_tp", 1) > 1:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over parameters that mix plain tensors and DTensors on different meshes (TP, 2-D):
    the norm of each group (same mesh) is computed and made whole separately, then combined; returns it."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    sq = 0.0
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        n = n.full_tensor() if hasattr(n, "full_tensor") else n
        sq += float(n) ** 2
    total = sq ** 0.5
    if max_norm < float("inf") and total > max_norm and total == total:
        coef = max_norm / (total + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def scale_grads_(params: list[nn.Parameter], scale: float) -> None:
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    for grads in groups.values():
        torch._foreach_mul_(grads, scale)


__all__ = ["parallelize", "check_tp", "block_plan", "COLWISE", "ROWWISE", "loss_context", "clip_grad_norm_", "scale_grads_"]
