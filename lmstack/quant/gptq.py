"""GPTQ int4 calibration (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1; the lazy-batch / Cholesky form of the reference implementation).

For a linear layer with weight ``W`` (out, in) and calibration inputs ``X`` (n, in), GPTQ quantizes the columns
of ``W`` one at a time and spreads each column's rounding error over the columns not yet quantized, weighted by
the inverse Hessian of the layer's squared output error ``H = 2 X^T X / n`` (+ 1% mean-diagonal dampening)::

    for column j:   q_j = quant(w_j);   e = (w_j - q_j) / [H^-1]_jj;   w_{j+1:} -= e [H^-1]_{j, j+1:}

using the upper Cholesky factor of ``H^-1`` (numerically what the paper's row updates compute). Group parameters
(min/max of each ``group_size`` run of inputs) are taken when the group's first column is reached, from the
already error-corrected weights. The result is the same int4 format as round-to-nearest
(:class:`lmstack.quant.packed.Int4PackedLinear`), so loading and serving do not change.

Layers are calibrated block by block: the calibration activations enter block ``i`` as block ``i - 1`` computes
them *after* its own quantization (the paper's sequential setting).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.errors import ConfigError
from lmstack.quant.packed import INT4_GROUP_SIZES, Int4PackedLinear, pack_nibbles


def gptq_int4(w: Tensor, H: Tensor, group_size: int, damp: float = 0.01,
              block: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """w (out, in), H (in, in) -> q (out, in) uint8 in [0, 15], scale, zero (out, in / group_size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small column updates: one thread is ~10x faster on a busy CPU
    try:
        return _gptq_int4(w, H, group_size, damp, block)
    finally:
        torch.set_num_threads(threads)


def _gptq_int4(w: Tensor, H: Tensor, group_size: int, damp: float, block: int) -> tuple[Tensor, Tensor, Tensor]:
    W = w.detach().float().clone()
    H = H.detach().double().clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0  # inputs never active in calibration: their weights cannot matter there
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    block = max(block, group_size) // group_size * group_size
    Q = torch.zeros(W.shape, dtype=torch.uint8)
    scales = torch.zeros(W.shape[0], n // group_size)
    lows = torch.zeros_like(scales)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                grp = W1[:, i:i + group_size]
                lo, hi = grp.amin(1), grp.amax(1)
                scale = ((hi - lo) / 15).clamp_min(1e-8)
                scales[:, col // group_size], lows[:, col // group_size] = scale, lo
            w_col = W1[:, i]
            q = torch.round((w_col - lo) / scale).clamp_(0, 15)
            Q[:, col] = q.to(torch.uint8)
            err = (w_col - (q * scale + lo)) / Hb[i, i]
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q, scales, lows + 8 * scales


def _block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calib: Tensor, group_size: int = 32) -> list[str]:
    """Quantize every decoder linear of an lmstack Transformer to int4 with GPTQ, in place.

    calib: (n_seq, seq_len) token ids. Returns the swapped module names (as ``quantize_linears`` does)."""
    from lmstack.model.attention import CausalContext
    from lmstack.model.transformer import signed_sin

    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size} is not supported for int4; choose one of "
                          f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    x = model.model.embed_tokens(calib).float()  # (N, T, hidden)
    pos = torch.arange(calib.shape[1])[None].expand(calib.shape[0], -1)
    cos, sin = model.rope(pos, x.dtype)
    sin = signed_sin(sin)
    ctx = CausalContext(None, model.config.attention_window)
    names = []
    for li, layer in enumerate(model.model.layers):
        linears = _block_linears(layer)
        bad = [(n, m.in_features) for n, m in linears if m.in_features % group_size]
        if bad:
            raise ConfigError(f"--group-size {group_size} does not divide in_features {bad[0][1]} of "
                              f"model.layers.{li}.{bad[0][0]}")
        hessians: dict[str, Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name):
            def fn(mod, inp, out):
                a = inp[0].reshape(-1, inp[0].shape[-1]).double()  # (tokens, in)
                hessians[name] = hessians.get(name, 0) + 2 * a.t() @ a
                counts[name] = counts.get(name, 0) + a.shape[0]
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in linears]
        layer(x, cos, sin, ctx)
        for h in handles:
            h.remove()
        for name, lin in linears:
            q, scale, zero = gptq_int4(lin.weight, hessians[name] / counts[name], group_size)
            new = Int4PackedLinear(lin.in_features, lin.out_features, lin.bias is not None, group_size,
                                   dtype=lin.weight.dtype)
            new.weight, new.weight_scale, new.weight_zero = pack_nibbles(q), scale, zero
            if lin.bias is not None:
                new.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)
            names.append(f"model.layers.{li}.{name}")
        x = layer(x, cos, sin, ctx)  # the next block sees this block's quantized outputs
    return names
