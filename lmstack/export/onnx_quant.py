"""``lmstack export --format onnx --dtype int8|int4``: the ONNX decoder with lmstack's quantized weights.

    export_onnx("models/smollm2-awq", "smollm2-int4-onnx", dtype="int4")   # an lmstack int4 checkpoint as stored
    export_onnx("models/smollm2", "smollm2-int8-onnx", dtype="int8")       # a float model: int8 RTN first

Each quantized linear layer becomes one onnxruntime ``com.microsoft.MatMulNBits`` node holding the weights
``lmstack quantize`` wrote (so GPTQ / AWQ calibration carries over), not a second quantization by another tool:

* int4 (group ``g``): ``B`` (N, K / g, g / 2) uint8 is lmstack's packed weight unchanged (both put the even column
  in the low nibble), ``scales`` (N * K / g) its scales, and ``zero_points`` float (N * K / g). MatMulNBits
  computes ``(q - zp) * scale``; lmstack's ``(q - 8) * scale + zero`` is that with ``zp = 8 - zero / scale``.
* int8 (per output channel, ``lm_head`` of an int4 model too): ``bits=8``, blocks of the largest power of two
  (>= 16) dividing K, ``q + 128`` as uint8 with zero point 128 and the row's scale repeated per block: exactly
  ``q * scale``.

With onnxruntime's default ``accuracy_level`` the activations stay float (the weights are dequantized block by
block inside the kernel), so the graph's logits equal lmstack's quantized model up to summation order. (onnxruntime's
own ``quantize_dynamic`` / ``MatMulNBitsQuantizer`` would quantize the float weights again with their own rounding.)

How: the model is traced in float32 with every packed layer replaced by an ``nn.Linear`` holding its dequantized
weight (:func:`dequantized_copy`); torch.onnx folds each weight's transpose into an anonymous initializer, so
each ``MatMul`` whose weight operand is (the transpose of) a constant equal to a quantized layer's dequantized
weight is found by content and replaced (:func:`rewrite_quantized`). Every quantized layer must be found once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.transformer import Transformer

ONNX_QUANT_DTYPES = ("int8", "int4")
MS_DOMAIN = "com.microsoft"


def quantized_model(src: Path, dtype: str, group_size: int) -> Transformer:
    """``src`` loaded as an lmstack int8 / int4 model: a directory ``lmstack quantize`` wrote (its method must be
    ``dtype``), or a float one quantized here (round to nearest, ``lm_head`` int8, as ``lmstack quantize``)."""
    from lmstack.model.hf_io import load_model
    from lmstack.quant.checkpoint import load_quantized, quantization_config, quantize_transformer

    qc = quantization_config(src)
    if qc is not None:
        if qc["method"] != dtype:
            raise ConfigError(f"{src} holds {qc['method']} weights; export it with --dtype {qc['method']} "
                              f"(or give the float model for --dtype {dtype})")
        return load_quantized(src, device="cpu", dtype="float32")
    model = load_model(src, device="cpu", dtype="float32")
    quantize_transformer(model, dtype, group_size)
    return model


def dequantized_copy(model: Transformer) -> dict[str, nn.Module]:
    """Replace each packed layer of ``model`` (in place) by an ``nn.Linear`` with its dequantized weight; returns
    name -> the packed layer."""
    from lmstack.quant.packed import Int4PackedLinear, Int8PackedLinear

    packed = {n: m for n, m in model.named_modules() if isinstance(m, (Int8PackedLinear, Int4PackedLinear))}
    for name, m in packed.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(m.dequantize(torch.float32), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return packed


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def int8_block(k: int) -> int:
    b = k & -k  # the largest power of two dividing k
    if b < 16:
        raise ConfigError(f"int8 ONNX export needs in_features divisible by 16 (MatMulNBits blocks), got {k}")
    return min(b, 1 << 12)


def matmul_nbits(name: str, a: str, y: str, m: nn.Module) -> tuple[object, list]:
    """The MatMulNBits node and its initializers for the packed layer ``m`` (module docstring)."""
    from onnx import helper, numpy_helper

    from lmstack.quant.packed import Int4PackedLinear

    n, k = m.out_features, m.in_features
    if isinstance(m, Int4PackedLinear):
        g, bits = m.group_size, 4
        b = m.weight.numpy().reshape(n, k // g, g // 2)
        scale = m.weight_scale.float().numpy()
        zp = (8 - m.weight_zero.float().numpy() / scale).astype(np.float32)
    else:
        g, bits = int8_block(k), 8
        b = (m.weight.numpy().astype(np.int16) + 128).astype(np.uint8).reshape(n, k // g, g)
        scale = np.repeat(m.weight_scale.float().numpy()[:, None], k // g, 1)
        zp = np.full(n * (k // g), 128, np.uint8)
    inits = [numpy_helper.from_array(np.ascontiguousarray(b), f"{name}.qweight"),
             numpy_helper.from_array(np.ascontiguousarray(scale.reshape(-1), dtype=np.float32), f"{name}.scales"),
             numpy_helper.from_array(np.ascontiguousarray(zp.reshape(-1)), f"{name}.zero_points")]
    node = helper.make_node("MatMulNBits", [a] + [t.name for t in inits], [y], name=f"{name}.MatMulNBits",
                            domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=g)
    return node, inits


def rewrite_quantized(model_proto, packed: dict[str, nn.Module]) -> None:
    """Replace, in ``model_proto`` (onnx.ModelProto, weights loaded), every MatMul by a quantized layer's float
    weight with the layer's MatMulNBits node; drop the float weights nothing else reads."""
    from onnx import helper, numpy_helper

    g = model_proto.graph
    by_digest: dict[str, str] = {}
    for name, m in packed.items():
        w = m.dequantize(torch.float32).numpy()  # (N, K); the MatMul reads its transpose (K, N)
        by_digest[_digest(w.T)] = by_digest[_digest(w)] = name  # folded transpose / Transpose(weight)
    inits = {t.name: t for t in g.initializer}
    producer = {o: nd for nd in g.node for o in nd.output}
    found: dict[str, int] = {}
    new_nodes, new_inits = [], []
    for nd in g.node:
        if nd.op_type == "MatMul" and len(nd.input) == 2:
            b, transposed = nd.input[1], False
            if b not in inits and b in producer and producer[b].op_type == "Transpose" \
                    and producer[b].input[0] in inits and list(producer[b].attribute[0].ints) == [1, 0]:
                b, transposed = producer[b].input[0], True
            if b in inits and len(inits[b].dims) == 2:
                arr = numpy_helper.to_array(inits[b])
                name = by_digest.get(_digest(arr))
                m = packed.get(name)
                if m is not None and tuple(arr.shape) == ((m.out_features, m.in_features) if transposed
                                                          else (m.in_features, m.out_features)):
                    node, extra = matmul_nbits(f"{name}.{found.get(name, 0)}", nd.input[0], nd.output[0], m)
                    found[name] = found.get(name, 0) + 1
                    new_nodes.append(node)
                    new_inits += extra
                    continue
        new_nodes.append(nd)
    missing = sorted(set(packed) - set(found))
    if missing:
        raise CheckpointError(f"ONNX export: {len(missing)} quantized layer(s) not found in the traced graph, "
                              f"e.g. {missing[0]}; export --dtype f32")
    del g.node[:]
    g.node.extend(new_nodes)
    # drop initializers (and Transpose nodes) nothing reads any more
    while True:
        used = {i for nd in g.node for i in nd.input} | {o.name for o in g.output}
        dead = [nd for nd in g.node if nd.op_type == "Transpose" and not (set(nd.output) & used)]
        if not dead:
            break
        for nd in dead:
            g.node.remove(nd)
    used = {i for nd in g.node for i in nd.input}
    keep = [t for t in g.initializer if t.name in used] + new_inits
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(op.domain == MS_DOMAIN for op in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def finish_quantized(path: Path, packed: dict[str, nn.Module], dtype: str, external_bytes: int) -> None:
    """Load the traced float graph at ``path``, rewrite its quantized layers, save it back (one file unless the
    remaining weights exceed ``external_bytes``)."""
    import onnx

    proto = onnx.load(str(path))  # with its external data, if any
    data = path.with_name(path.name + ".data")
    rewrite_quantized(proto, packed)
    proto.metadata_props.add(key="lmstack.quantization", value=dtype)
    path.unlink()
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size > external_bytes:
        onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(proto, str(path))
