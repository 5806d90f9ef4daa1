"""AWQ int4 calibration (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", §3.2 and the reference implementation's ``auto_scale``).

A few input channels of a linear layer carry much larger activations than the rest; their weights matter most,
and plain round-to-nearest gives them the same step as every other weight of the group. AWQ scales those input
channels up before quantizing and divides the activations by the same factor, which the previous operation
absorbs exactly (the RMSNorm weight, or the rows of the projection that produced the input)::

    y = W x = (W diag(s)) (diag(s)^-1 x)           quantize W diag(s); fold 1/s into what computes x

Per group of linears that read the same input, ``s = mean|x|^alpha`` (normalised to ``sqrt(max s * min s) = 1``)
with ``alpha`` picked from a grid on [0, 1) to minimise the squared output error on calibration activations,
``|| X W^T - X (Q(W diag(s)) diag(s)^-1)^T ||^2``, computed from ``X^T X`` (so every calibration token counts and the
search's cost does not grow with their number). ``alpha = 0`` is plain round-to-nearest, so on the calibration
set AWQ is never worse. The groups of a decoder block (as in the reference for Llama):

    input_layernorm           -> q_proj, k_proj, v_proj
    v_proj (rows)             -> o_proj            (only without grouped-query attention: one v row per o column)
    post_attention_layernorm  -> gate_proj, up_proj
    up_proj (rows)            -> down_proj         (silu(gate) * up is linear in up)

Blocks are calibrated in order; the activations entering block ``i`` are those of the blocks before it after
their quantization (as GPTQ in :mod:`lmstack.quant.gptq`). Weights are then quantized with the same group-wise
int4 round-to-nearest as ``--method int4`` (:func:`lmstack.quant.packed.quantize_int4`), so the checkpoint format,
loading and serving do not change; only the norm weights and the scaled projections differ from the float model.
Then, as the reference's ``auto_clip``, each scaled weight (but q / k, whose errors the reference leaves to the
attention scores) is clipped before rounding: per output row and group, the range ``[-m, m]`` with ``m`` =
``max|w| * (1 - i / 20)``, ``i < 10``, that minimises the group's share of the output error on the calibration
activations, ``d^T G_g d`` with ``G_g`` the group's diagonal block of ``X^T X`` (:func:`clip_search`); ``i = 0``
(no clipping) is on the grid, so clipping never raises that error. Rounding a few large weights coarsely buys a
finer step for all the others in the group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.errors import ConfigError
from lmstack.quant.packed import INT4_GROUP_SIZES, Int4PackedLinear, dequantize_int4, quantize_int4

N_GRID = 20  # alpha in {0, 0.05, ..., 0.95}, the reference's grid


def rtn_int4(w: Tensor, group_size: int) -> Tensor:
    """Round-to-nearest int4 of w (out, in), dequantized: what ``--method int4`` stores, as float32."""
    return dequantize_int4(*quantize_int4(w, group_size))


def awq_scales(x: Tensor, weights: list[Tensor], group_size: int, n_grid: int = N_GRID) -> tuple[Tensor, float, float]:
    """x (tokens, in) activations into every weight (out_i, in) of ``weights``.

    Returns (s (in,), best alpha, best error / round-to-nearest error) for the scales that minimise the mean squared
    output error after int4 quantization of ``W diag(s)``."""
    x = x.float()
    return awq_scales_from_stats(x.abs().mean(0), x.t() @ x / x.shape[0], weights, group_size, n_grid)


def awq_scales_from_stats(mean_abs: Tensor, gram: Tensor, weights: list[Tensor], group_size: int,
                          n_grid: int = N_GRID) -> tuple[Tensor, float, float]:
    """:func:`awq_scales` from the activations' statistics: ``mean_abs`` (in,) = mean |x| and ``gram`` (in, in) =
    X^T X / tokens. The output error of a weight error D (out, in) is ``mean_tokens |X D^T|^2 = sum(D G * D)``, so the
    search costs out * in^2 per grid point whatever the number of calibration tokens."""
    w = torch.cat([t.detach().float() for t in weights], 0)  # (sum out_i, in)
    gram = gram.float()
    best_err, best_s, best_alpha, rtn_err = float("inf"), torch.ones_like(mean_abs), 0.0, 0.0
    for i in range(n_grid):
        alpha = i / n_grid
        s = mean_abs.float().pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        d = rtn_int4(w * s, group_size) / s - w
        err = float(((d @ gram) * d).sum()) / w.shape[0]
        if i == 0:
            rtn_err = err
        if err < best_err:
            best_err, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha, best_err / max(rtn_err, 1e-30)


N_CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # the reference's auto_clip grid: shrink max|w| by up to half in 5% steps


def clip_search(w: Tensor, gram: Tensor, group_size: int, n_grid: int = N_CLIP_GRID,
                max_shrink: float = CLIP_MAX_SHRINK) -> Tensor:
    """(out, in / group_size) clip values ``m`` for ``w`` (out, in) whose input has second moments ``gram`` (in, in):
    per row and group, the ``m`` that minimises ``d^T G_g d`` (``d`` = rounded clamp(w, -m, m) - w on the group,
    ``G_g`` the group's diagonal block of ``gram``)."""
    out_f, in_f = w.shape
    ng = in_f // group_size
    w = w.detach().float()
    wg = w.view(out_f, ng, group_size)
    blocks = torch.stack([gram[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                          for g in range(ng)]).float()  # (ng, gs, gs)
    org = wg.abs().amax(-1)  # (out, ng)
    best_m, best_err = org.clone(), torch.full_like(org, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        m = org * (1 - i / n_grid)
        c = torch.maximum(torch.minimum(wg, m[..., None]), -m[..., None]).view(out_f, in_f)
        d = (rtn_int4(c, group_size) - w).view(out_f, ng, group_size)
        err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)  # (out, ng)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_m = torch.where(better, m, best_m)
    return best_m


@torch.no_grad()
def apply_clip(lin: nn.Linear, m: Tensor, group_size: int) -> None:
    out_f, in_f = lin.weight.shape
    wg = lin.weight.view(out_f, in_f // group_size, group_size)
    mm = m.to(wg.dtype)[..., None]
    wg.copy_(torch.maximum(torch.minimum(wg, mm), -mm))


def _block_groups(layer: nn.Module, mha: bool) -> list[tuple[nn.Module, list[str]]]:
    """(the op whose output feeds the group, the group's linear names) for one decoder block."""
    a, m = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    if mha:
        groups.append((a.v_proj, ["self_attn.o_proj"]))
    groups += [(layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"]), (m.up_proj, ["mlp.down_proj"])]
    return groups


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: Tensor) -> None:
    """``prev``'s output channels / s, each linear's input columns * s: the float model computes the same."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # RMSNorm
        prev.weight.div_(s.to(prev.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


@torch.no_grad()
def awq_quantize_model(model: nn.Module, calib: Tensor, group_size: int = 64, quantize: bool = True,
                       clip: bool = True) -> list[str]:
    """Scale, clip and quantize every decoder linear of an lmstack Transformer to int4 with AWQ, in place.

    calib: (n_seq, seq_len) token ids. ``quantize=False`` only folds the scales (the float model is unchanged up to
    rounding; tests use it; no clipping then). ``clip=False`` skips the clipping search. Returns the swapped module
    names (as ``quantize_linears`` does)."""
    from lmstack.model.attention import CausalContext
    from lmstack.model.transformer import MLP, signed_sin

    cfg = model.config
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size} is not supported for int4; choose one of "
                          f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    if any(not isinstance(layer.ffn, MLP) for layer in model.model.layers):
        raise ConfigError("--method awq supports dense decoders; for mixture-of-experts models use int4 or gptq")
    x = model.model.embed_tokens(calib).float()  # (N, T, hidden)
    pos = torch.arange(calib.shape[1])[None].expand(calib.shape[0], -1)
    cos, sin = model.rope(pos, x.dtype)
    sin = signed_sin(sin)
    ctx = CausalContext(None, cfg.attention_window)
    mha = cfg.num_attention_heads == cfg.num_key_value_heads
    names = []
    for li, layer in enumerate(model.model.layers):
        groups = _block_groups(layer, mha)
        bad = [(n, layer.get_submodule(n).in_features) for _, ns in groups for n in ns
               if layer.get_submodule(n).in_features % group_size]
        if bad:
            raise ConfigError(f"--group-size {group_size} does not divide in_features {bad[0][1]} of "
                              f"model.layers.{li}.{bad[0][0]}")
        stats: dict[str, list] = {}  # name -> [sum |x| (in,), X^T X (in, in), tokens]

        def hook(name):
            def fn(mod, inp, out):
                a = inp[0].reshape(-1, inp[0].shape[-1]).float()  # (tokens, in)
                st = stats.setdefault(name, [0, 0, 0])
                st[0], st[1], st[2] = st[0] + a.abs().sum(0), st[1] + a.t() @ a, st[2] + a.shape[0]
            return fn

        firsts = [ns[0] for _, ns in groups] + ([] if mha else ["self_attn.o_proj"])
        handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in firsts]
        layer(x, cos, sin, ctx)
        for h in handles:
            h.remove()
        for prev, ns in groups:
            abs_sum, xtx, n = stats[ns[0]]
            lins = [layer.get_submodule(n) for n in ns]
            s, _, _ = awq_scales_from_stats(abs_sum / n, xtx / n, [m.weight for m in lins], group_size)
            fold_scales(prev, lins, s)
            if clip and quantize:  # the input of W diag(s) is x / s: its second moments are G / (s s^T)
                g_scaled = (xtx / n).float() / (s[:, None] * s[None, :]).float()
                for name, lin in zip(ns, lins):
                    if not name.endswith(("q_proj", "k_proj")):
                        apply_clip(lin, clip_search(lin.weight, g_scaled, group_size), group_size)
        if clip and quantize and not mha:  # o_proj has no scale group under grouped-query attention
            _, xtx, n = stats["self_attn.o_proj"]
            o = layer.self_attn.o_proj
            apply_clip(o, clip_search(o.weight, xtx / n, group_size), group_size)
        if quantize:
            for _, ns in groups if mha else groups + [(None, ["self_attn.o_proj"])]:
                for n in ns:
                    parent, _, child = n.rpartition(".")
                    setattr(layer.get_submodule(parent), child,
                            Int4PackedLinear.from_linear(layer.get_submodule(n), group_size))
                    names.append(f"model.layers.{li}.{n}")
        x = layer(x, cos, sin, ctx)  # the next block sees this block's quantized outputs
    return names
