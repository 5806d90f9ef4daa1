"""Weight-only quantization as module swaps: int8 per-channel and 4-bit NF4 group-wise linears."""

from lmstack.quant.linear import (
    NF4_CODEBOOK, Int8Linear, NF4Linear, QuantLinear, dequantize_int8, dequantize_nf4, quantize_int8,
    quantize_model, quantize_nf4,
)

__all__ = [
    "NF4_CODEBOOK", "Int8Linear", "NF4Linear", "QuantLinear", "dequantize_int8", "dequantize_nf4",
    "quantize_int8", "quantize_model", "quantize_nf4",
]
