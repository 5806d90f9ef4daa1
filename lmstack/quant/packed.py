"""Weight-only int8 / int4 linears for inference, run by PyTorch's packed matmul kernels (module swaps).

* ``Int8PackedLinear``: symmetric per-output-channel int8 (gpt-fast ``WeightOnlyInt8Linear``):
  ``W[n, k] = q[n, k] * s[n]``, ``q in [-127, 127]``, ``s[n] = max_k |W[n, k]| / 127``.
  ``y = torch._weight_int8pack_mm(x, q, s)`` (CPU and CUDA), which reads one byte per weight.
* ``Int4PackedLinear``: asymmetric group-wise int4 (gpt-fast / torchao "tinygemm" int4): each run of
  ``group_size`` weights along the input dim has a scale and a zero point,
  ``W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]`` with ``g = k // group_size``, ``q in [0, 15]``,
  ``scale = (max - min) / 15``, ``zero = min + 8 * scale`` (round to nearest). On CPU
  ``torch._weight_int4pack_mm_for_cpu``; on CUDA ``torch._weight_int4pack_mm`` (bf16); both read half a byte
  per weight. Where those kernels are slow (a CPU without AVX-512, see :func:`use_packed_kernel`), elsewhere, or
if the kernel refuses a shape, the layer is dequantized for one matmul, a block of output rows at a time
(:func:`blockwise_linear`: at most ``DEQUANT_BLOCK_BYTES`` of float weight exist at once, so a 136 M-weight int8
``lm_head`` does not briefly cost two 544 MB fp32 copies; memory stays int8 / int4 between calls).

On disk (safetensors, any device can read it) an int8 layer is ``weight`` int8 (out, in) + ``weight_scale``
(out,); an int4 layer is ``weight`` uint8 (out, in / 2), two values per byte (low nibble = even column),
``weight_scale`` and ``weight_zero`` (out, in / group_size). The kernel layout is built from it on first use
on a device. These modules never train (QLoRA uses :mod:`lmstack.quant.linear`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import ConfigError
from lmstack.quant.linear import quantize_int8

INT4_GROUP_SIZES = (32, 64, 128, 256)


def use_packed_kernel(device: torch.device) -> bool:
    """Whether the packed kernels are the fast path on ``device``. On CUDA, yes. On CPU, PyTorch's int8 / int4
    kernels are vectorised for AVX-512 only: on an AVX2 CPU they run 10-80x slower than the fp32 matmul
    (benchmarks/quant.py), and dequantizing the layer for one fp32 matmul is faster. ``LMSTACK_QUANT_KERNEL=1``
    or ``0`` forces the choice (tests and benchmarks compare both)."""
    forced = os.environ.get("LMSTACK_QUANT_KERNEL")
    if forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


# ---------------------------------------------------------------------------------------------- int4 maths
def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w (out, in) -> q (out, in) uint8 in [0, 15], scale and zero (out, in / group_size) float32 (RTN)."""
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)  # (out, n_groups)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return q, scale, lo + 8 * scale


def dequantize_int4(q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    out_f, in_f = q.shape
    gs = in_f // scale.shape[1]
    w = (q.float().reshape(out_f, -1, gs) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(out_f, in_f).to(dtype)


def pack_nibbles(q: Tensor) -> Tensor:
    """(out, in) values in [0, 15] -> (out, in / 2) uint8, low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: Tensor) -> Tensor:
    return torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(p.shape[0], -1)


DEQUANT_BLOCK_BYTES = 16 << 20  # float weight dequantized at once by the fallback path


def blockwise_linear(x2: Tensor, rows_fn, out_features: int, in_features: int) -> Tensor:
    """``x2 @ W.T`` (M, out) with ``W`` built by ``rows_fn(start, stop, dtype)`` (rows start:stop of the float
    weight) in blocks of at most ``DEQUANT_BLOCK_BYTES``: the same products as one dequantized matmul, without
    the whole float matrix (and its temporaries) in memory."""
    step = max(1, DEQUANT_BLOCK_BYTES // (in_features * x2.element_size()))
    if step >= out_features:
        return F.linear(x2, rows_fn(0, out_features, x2.dtype))
    y = x2.new_empty(x2.shape[0], out_features)
    for a in range(0, out_features, step):
        b = min(a + step, out_features)
        y[:, a:b] = F.linear(x2, rows_fn(a, b, x2.dtype))
    return y


# ---------------------------------------------------------------------------------------------- modules
class _PackedLinear(nn.Module):
    in_features: int
    out_features: int

    def _bias(self, y: Tensor) -> Tensor:
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8PackedLinear(_PackedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self._scale_cache: tuple[torch.dtype, torch.device, Tensor] | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8PackedLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                dtype=lin.weight.dtype)
        m.weight, m.weight_scale = quantize_int8(lin.weight.data)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:  # (out, in)
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:  # (stop-start, in)
        return self.weight[start:stop].to(dtype) * self.weight_scale[start:stop].to(dtype)[:, None]

    def _scales(self, x: Tensor) -> Tensor:
        c = self._scale_cache
        if c is None or c[0] != x.dtype or c[1] != x.device:
            c = self._scale_cache = (x.dtype, x.device, self.weight_scale.to(x.device, x.dtype))
        return c[2]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and use_packed_kernel(x.device):
            y = torch._weight_int8pack_mm(x2, self.weight, self._scales(x))  # (M, out)
        else:
            y = blockwise_linear(x2, self.dequantize_rows, self.out_features, self.in_features)
        return self._bias(y).reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):  # .to(): the cached scales follow on the next forward
        self._scale_cache = None
        return super()._apply(fn, recurse)


class Int4PackedLinear(_PackedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64,
                 device=None, dtype=torch.float32):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group size {group_size} is not supported; choose one of "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        if in_features % group_size:
            raise ConfigError(f"int4 group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", torch.zeros(out_features, n_groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self._kernel: tuple | None = None  # ((device, dtype, fast), packed weight, scales-and-zeros)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 64) -> "Int4PackedLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, device=lin.weight.device,
                dtype=lin.weight.dtype)
        q, scale, zero = quantize_int4(lin.weight.data, group_size)
        m.weight, m.weight_scale, m.weight_zero = pack_nibbles(q), scale, zero
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:  # (out, in)
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows start:stop: ``q * scale + (zero - 8 * scale)`` per group (unpack, convert, one fused multiply-add)."""
        n = stop - start
        q = unpack_nibbles(self.weight[start:stop]).view(n, -1, self.group_size).to(dtype)  # (n, n_groups, g)
        s, z = self.weight_scale[start:stop], self.weight_zero[start:stop]
        lo = (z - 8 * s).to(dtype)[..., None]
        return torch.addcmul(lo, q, s.to(dtype)[..., None]).view(n, self.in_features)

    def _build(self, x: Tensor):
        """The kernel's packed weight and (n_groups, out, 2) scales-and-zeros for x's device and dtype."""
        q = unpack_nibbles(self.weight).to(torch.int32)  # (out, in)
        sz = torch.stack([self.weight_scale.t(), self.weight_zero.t()], -1).contiguous()  # (n_groups, out, 2)
        if x.device.type == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
            return packed, sz.to(x.dtype)
        if x.device.type == "cuda" and x.dtype == torch.bfloat16 and self.out_features % 8 == 0 \
                and self.in_features % 128 == 0:  # tinygemm tiles: n % 8, k % (16 * innerKTiles)
            p = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(x.device)
            return torch._convert_weight_to_int4pack(p, 8), sz.to(x.device, torch.bfloat16)
        return None, None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()
        fast = x.dtype in (torch.float32, torch.bfloat16, torch.float16) and use_packed_kernel(x.device)
        k = self._kernel
        if k is None or k[0] != (x.device, x.dtype, fast):
            packed, sz = self._build(x) if fast else (None, None)
            k = self._kernel = ((x.device, x.dtype, fast), packed, sz)
        if k[1] is None:
            y = blockwise_linear(x2, self.dequantize_rows, self.out_features, self.in_features)
        elif x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, k[1], self.group_size, k[2])
        else:
            y = torch._weight_int4pack_mm(x2, k[1], self.group_size, k[2])
        return self._bias(y).reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):  # .to() / .cuda(): the kernel layout is rebuilt on the next forward
        self._kernel = None
        return super()._apply(fn, recurse)


PACKED_METHODS = ("int8", "int4")


def quantize_linears(model: nn.Module, method: str, group_size: int = 64,
                     skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Swap every plain ``nn.Linear`` (except names ending in ``skip``) for a packed int8 / int4 one, in place,
    one layer at a time. Returns the swapped module names."""
    if method not in PACKED_METHODS:
        raise ConfigError(f"quantization method {method!r} is not supported; supported: {', '.join(PACKED_METHODS)}")
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(skip)]
    if method == "int4":
        if group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"--group-size {group_size} is not supported for int4; choose one of "
                              f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        bad = [(n, m.in_features) for n, m in targets if m.in_features % group_size]
        if bad:
            ok = [g for g in INT4_GROUP_SIZES if all(k % g == 0 for _, k in bad)]
            raise ConfigError(f"--group-size {group_size} does not divide in_features {bad[0][1]} of {bad[0][0]}; "
                              f"use {' or '.join(map(str, ok)) or 'int8'}")
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Int8PackedLinear.from_linear(lin) if method == "int8" else Int4PackedLinear.from_linear(lin, group_size)
        setattr(parent, child, q)
    return [n for n, _ in targets]


def empty_packed(lin_shape: tuple[int, int, bool], method: str, group_size: int, dtype: torch.dtype) -> nn.Module:
    """An uninitialised packed layer (in, out, bias) to receive a saved state dict."""
    in_f, out_f, bias = lin_shape
    if method == "int8":
        return Int8PackedLinear(in_f, out_f, bias, dtype=dtype)
    return Int4PackedLinear(in_f, out_f, bias, group_size, dtype=dtype)


# ---------------------------------------------------------------------------------------------- decode kernel
KERNEL_LINEARS = (nn.Linear, Int8PackedLinear, Int4PackedLinear)


def kernel_tensors(m: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """One layer as the compiled CPU decode kernel (``lmstack.kernels``) reads it, with no copy:
    ``(weight, scale, zero)``: an fp32 ``nn.Linear``'s row-major weight and empty scale / zero, an int8 layer's
    int8 weight, scale and empty zero, an int4 layer's packed weight, scale and zero."""
    empty = torch.empty(0)
    if type(m) is nn.Linear:
        return m.weight.detach().contiguous(), empty, empty
    if type(m) is Int8PackedLinear:
        return m.weight, m.weight_scale, empty
    if type(m) is Int4PackedLinear:
        return m.weight, m.weight_scale, m.weight_zero
    raise TypeError(f"the decode kernel cannot read a {type(m).__name__}")
