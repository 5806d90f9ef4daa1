"""Weight-only quantization as module swaps.

* :mod:`lmstack.quant.linear`: int8 per-channel and 4-bit NF4 linears that train (QLoRA's frozen base).
* :mod:`lmstack.quant.packed`: int8 per-channel and int4 group-wise linears for inference on PyTorch's packed
  kernels; :mod:`lmstack.quant.checkpoint` writes and loads quantized model directories (``lmstack quantize``).
"""

from lmstack.quant.checkpoint import load_any, load_quantized, quantization_config, quantize_checkpoint
from lmstack.quant.linear import (
    NF4_CODEBOOK, Int8Linear, NF4Linear, QuantLinear, dequantize_int8, dequantize_nf4, quantize_int8,
    quantize_model, quantize_nf4,
)
from lmstack.quant.packed import Int4PackedLinear, Int8PackedLinear, quantize_int4, quantize_linears

__all__ = [
    "NF4_CODEBOOK", "Int8Linear", "NF4Linear", "QuantLinear", "dequantize_int8", "dequantize_nf4",
    "quantize_int8", "quantize_model", "quantize_nf4",
    "Int4PackedLinear", "Int8PackedLinear", "quantize_int4", "quantize_linears",
    "load_any", "load_quantized", "quantization_config", "quantize_checkpoint",
]
