"""Weight-only quantized linear layers (module swaps for ``nn.Linear``).

* ``Int8Linear``: symmetric per-output-channel absmax int8 (gpt-fast ``WeightOnlyInt8Linear``):
  ``w ≈ q * s``, ``q ∈ [-127, 127]``, ``s = max|w_row| / 127``.
* ``NF4Linear``: 4-bit NormalFloat, block-wise absmax (Dettmers et al. 2023, "QLoRA", §3 and appendix E):
  each group of ``group_size`` consecutive weights is scaled by its absmax into [-1, 1] and each value is
  replaced by the index of the nearest of the 16 NF4 levels (quantiles of N(0, 1), with an exact zero).
  Two 4-bit indices are packed into one byte (high nibble first).

Both layers keep only the packed weights and scales; the floating-point weight exists for one layer at a
time during forward *and backward*: a custom autograd function dequantizes again in backward instead of
saving the dequantized matrix (bitsandbytes ``MatMul4Bit`` does the same), which is what makes a frozen
4-bit base cheaper than a frozen fp32 one during LoRA training. The weights never receive gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import ConfigError

# The 16 NF4 levels as published with QLoRA (bitsandbytes ``create_normal_map(offset=0.9677083)``).
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236328, 1.0,
])
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2  # (15,) decision boundaries


# ---------------------------------------------------------------------------------------------- int8
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> q (out, in) int8, scale (out,) float32."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.to(dtype) * scale.to(dtype)[:, None])  # (out, in)


# ---------------------------------------------------------------------------------------------- nf4
def quantize_nf4(w: Tensor, group_size: int = 64) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> packed (ceil(numel/2),) uint8, absmax (n_groups,) float32.

    The flattened weight is split into groups of ``group_size`` (the last one zero-padded)."""
    if group_size <= 0 or group_size % 2:
        raise ConfigError(f"quant.group_size must be a positive even number, got {group_size}")
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % group_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, group_size)  # (n_groups, group_size)
    absmax = groups.abs().amax(dim=1).clamp_min(1e-12)  # (n_groups,)
    normed = groups / absmax[:, None]  # in [-1, 1]
    idx = torch.bucketize(normed, _NF4_MIDPOINTS.to(normed.device)).to(torch.uint8).view(-1)  # nearest level
    packed = (idx[0::2] << 4) | idx[1::2]  # (n_padded/2,)
    return packed, absmax


_PAIR_TABLES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _pair_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(256, 2): the two NF4 levels packed in each byte value, so dequantization is one gather."""
    key = (device, dtype)
    if key not in _PAIR_TABLES:
        b = torch.arange(256)
        _PAIR_TABLES[key] = torch.stack([NF4_CODEBOOK[b >> 4], NF4_CODEBOOK[b & 0x0F]], 1).to(device, dtype)
    return _PAIR_TABLES[key]


def dequantize_nf4(packed: Tensor, absmax: Tensor, shape: tuple[int, int], group_size: int = 64,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    vals = _pair_table(packed.device, dtype)[packed.long()].view(-1, group_size)  # (n_groups, group_size)
    vals = vals * absmax.to(dtype)[:, None]
    n = shape[0] * shape[1]
    return vals.view(-1)[:n].view(shape)


# ---------------------------------------------------------------------------------------------- modules
class _QuantMatmul(torch.autograd.Function):
    """y = x @ W^T with W rebuilt from the quantized module in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, module: "QuantLinear") -> Tensor:
        ctx.module = module
        w = module.dequantize(x.dtype)  # (out, in)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.module.dequantize(grad_out.dtype)
        return grad_out @ w, None  # (..., in)


class QuantLinear(nn.Module):
    """Common part: ``in_features``, ``out_features``, optional float ``bias``, no trainable weight."""

    in_features: int
    out_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:  # (out, in)
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):  # a custom Function is not autocast: cast ourselves
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if torch.is_grad_enabled() and x.requires_grad:
            y = _QuantMatmul.apply(x, self)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
        m.weight, m.weight_scale = quantize_int8(lin.weight.data)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.weight, self.weight_scale, dtype)


class NF4Linear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n = in_features * out_features
        n_pad = n + (-n) % group_size
        self.register_buffer("weight", torch.zeros(n_pad // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.ones(n_pad // group_size, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 64) -> "NF4Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, device=lin.weight.device)
        m.weight, m.weight_absmax = quantize_nf4(lin.weight.data, group_size)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4(self.weight, self.weight_absmax, (self.out_features, self.in_features),
                              self.group_size, dtype)


QUANT_METHODS = ("int8", "nf4")


def quantize_model(model: nn.Module, method: str = "nf4", group_size: int = 64,
                   skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap every ``nn.Linear`` (except names ending in ``skip``) for a quantized one, in place.

    Layers are converted one at a time, so peak memory is the float model plus one layer.
    Returns the number of layers swapped."""
    if method not in QUANT_METHODS:
        raise ConfigError(f"quantization method {method!r} is not supported; supported: {', '.join(QUANT_METHODS)}")
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and not name.endswith(skip)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Int8Linear.from_linear(lin) if method == "int8" else NF4Linear.from_linear(lin, group_size)
        setattr(parent, child, q)
        del lin
    return len(targets)
