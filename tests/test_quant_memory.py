"""A quantized model holds each weight once (issue 14, memory).

Structure, not timing: after loading a quantized checkpoint and decoding through the compiled kernel,
* no two parameters / buffers share storage unless the config ties them, and every matrix the kernel reads is
  one of them (no fused or converted second copy);
* no quantized layer keeps a floating-point (out, in) version of its weight;
* the eager fallback (prefill, batches above the kernel's) dequantizes at most ``DEQUANT_BLOCK_BYTES`` of a
  layer at once, and its products equal the whole-matrix dequantized matmul (reference: the stored tensors
  dequantized here with the format's formula).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lmstack.kernels as kernels
import lmstack.quant.packed as packed
from lmstack.quant import Int4PackedLinear, Int8PackedLinear, load_quantized, quantize_checkpoint
from lmstack.serve.engine import LLMEngine
from lmstack.serve.types import SamplingParams
from tests.engine_fixtures import hf_model

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=["int8", "int4"])
def qdir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"qmem_{request.param}")
    hf_model("qwen2", d / "m")  # tied embeddings: lm_head is untied into an int8 copy by quantize
    return request.param, quantize_checkpoint(d / "m", d / "q", method=request.param, group_size=32)


def _storages(model: torch.nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        out.setdefault(t.untyped_storage().data_ptr(), []).append(n)
    return out


def test_each_weight_is_held_once_and_the_kernel_reads_it_in_place(qdir, monkeypatch):
    monkeypatch.setenv("LMSTACK_QUANT_KERNEL", "0")  # the path of an AVX2 CPU (PyTorch's int4 layout is a copy)
    method, path = qdir
    model = load_quantized(path)
    eng = LLMEngine(model, block_size=4, enable_prefix_caching=False, use_kernel=kernels.load_cpu_decode())
    eng.add_request(list(range(5, 25)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    shared = [names for names in _storages(model).values() if len(names) > 1]
    assert shared == [], f"tensors sharing one storage (a tied pair would be the only allowed one): {shared}"
    n_quant = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (Int8PackedLinear, Int4PackedLinear)):
            n_quant += 1
            held = [v for v in list(vars(mod).values()) + list(mod._buffers.values()) + list(mod._parameters.values())
                    if isinstance(v, torch.Tensor)]
            cache = getattr(mod, "_kernel", None) or ()
            held += [v for v in cache if isinstance(v, torch.Tensor)]
            floats = [tuple(t.shape) for t in held if t.is_floating_point() and t.dim() == 2
                      and t.shape[0] == mod.out_features and t.shape[1] == mod.in_features]
            assert floats == [], f"{name} holds a float copy of its weight {floats}"
    assert n_quant == 2 * 7 + 1  # 2 layers x 7 linears + lm_head
    k = eng.runner.kernel
    if k is None:
        pytest.skip("compiled decode kernel unavailable")
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for t in k.weights + k.parts + k.qscale + k.qzero + [k.embed, k.norm, k.lm_head]:
        if t.dim() >= 2:  # every matrix; the one 1-D copy is q/k/v's biases joined (q_out + 2 kv_out floats)
            assert t.untyped_storage().data_ptr() in owned, "the kernel reads a tensor the model does not hold"


def _formula(sd: dict, name: str) -> torch.Tensor:
    """The stored layer's float weight from the on-disk format (lmstack.quant.packed docstring)."""
    q, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
    if q.dtype == torch.int8:
        return q.float() * s[:, None]
    vals = torch.empty(q.shape[0], q.shape[1] * 2)
    vals[:, 0::2], vals[:, 1::2] = (q & 0x0F).float(), (q >> 4).float()
    gs = vals.shape[1] // s.shape[1]
    return (vals - 8) * s.repeat_interleave(gs, 1) + sd[f"{name}.weight_zero"].repeat_interleave(gs, 1)


def test_fallback_dequantizes_in_bounded_blocks(qdir, monkeypatch):
    monkeypatch.setenv("LMSTACK_QUANT_KERNEL", "0")
    method, path = qdir
    model = load_quantized(path)
    sd = load_file(path / "model.safetensors")
    limit = 4096  # bytes: a few rows of the 64-wide test layers
    monkeypatch.setattr(packed, "DEQUANT_BLOCK_BYTES", limit)
    seen: list[int] = []
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for name in ("lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        mod = model.get_submodule(name)
        orig = mod.dequantize_rows

        def spy(a, b, dtype, orig=orig):
            w = orig(a, b, dtype)
            seen.append(w.numel() * w.element_size())
            return w

        monkeypatch.setattr(mod, "dequantize_rows", spy)
        xi = x[:, : mod.in_features] if mod.in_features <= 64 else torch.randn(5, mod.in_features)
        ref = xi @ _formula(sd, name).t()
        if mod.bias is not None:
            ref = ref + mod.bias
        torch.testing.assert_close(mod(xi), ref, rtol=1e-5, atol=1e-5)
    assert seen and max(seen) <= limit
    assert len(seen) > 3  # lm_head (vocab rows) took several blocks
