"""onnxruntime runs lmstack's ONNX exports of every dense architecture, in f32 and f16, and of the real SmolLM2-135M.

The fast check (``tests/test_export_onnx.py``) exports one architecture once; this file exports many (each export
takes 15-40 s on 2 shared cores), so it runs under ``make test-interop``, not ``make test``. The file name does not
match ``test_*.py`` on purpose: the default collection leaves it out; naming it on the command line runs it.

References: ``transformers`` computes the logits of each tiny model (the model lmstack loaded), lmstack's model
re-run on the whole sequence gives the greedy tokens. The SmolLM2 figures are printed (``-s`` shows them) and
recorded in docs/export.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmstack.export.onnx_export import export_onnx
from lmstack.export.onnx_runtime import OnnxCausalLM
from lmstack.model.hf_io import load_model
from tests.conftest import ARCHS
from tests.export_fixtures import smollm2_dir, tiny_model_dir

KW = {"mistral": {"sliding_window": 4}, "qwen3": {}, "llama": {}, "qwen2": {}}  # a window shorter than the test


def _inputs(vocab: int, T: int = 9, pad: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def _stepwise(lm: OnnxCausalLM, ids, mask, pos, prefill: int) -> np.ndarray:
    """Logits of the prefill of ``prefill`` tokens, then one cached step per remaining token."""
    got, past = lm.forward(ids[:, :prefill].numpy(), mask[:, :prefill].numpy(), pos[:, :prefill].numpy(),
                           lm.empty_past(ids.shape[0]))
    steps = [got]
    for t in range(prefill, ids.shape[1]):
        got, past = lm.forward(ids[:, t:t + 1].numpy(), mask[:, :t + 1].numpy(), pos[:, t:t + 1].numpy(), past)
        steps.append(got)
    return np.concatenate(steps, 1).astype(np.float32)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    x = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            x.append(int(model(torch.tensor([x]))[0, -1].argmax()))
    return x[len(prompt):]


def _compare_on_prompt(model, lm: OnnxCausalLM, tok, n: int = 32):
    """One English prompt through lmstack and onnxruntime: (max |logit diff| stepping the ONNX graph through
    its cache, lmstack's logits, ONNX greedy tokens, lmstack greedy tokens, how many agree from the start, n)."""
    prompt = tok.encode("The capital of France is Paris. The capital of Germany is", add_special_tokens=False)
    ids = torch.tensor([prompt])
    mask, pos = torch.ones_like(ids), torch.arange(len(prompt))[None]
    with torch.no_grad():
        want = model(ids).numpy()
    got = _stepwise(lm, ids, mask, pos, prefill=len(prompt) - 3)
    err = float(np.abs(got - want).max())
    gen = lm.generate([prompt], n)[0]
    ref = _greedy(model, prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(gen, ref)) if a != b), n)
    return err, want, gen, ref, same, n


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_f32_matches_transformers(arch, tmp_path):
    ref = tiny_model_dir(arch, tmp_path / "m", initializer_range=0.2, **KW[arch])
    lm = OnnxCausalLM(export_onnx(tmp_path / "m", tmp_path / "onnx"))
    ids, mask, pos = _inputs(384)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    got = _stepwise(lm, ids, mask, pos, prefill=5)
    valid = mask.bool().numpy()
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    model = load_model(tmp_path / "m", dtype="float32")
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    assert lm.generate(prompts, 10) == [_greedy(model, p, 10) for p in prompts]


def test_f16_and_external_data(tmp_path):
    ref = tiny_model_dir("qwen2", tmp_path / "m", initializer_range=0.2)
    out = export_onnx(tmp_path / "m", tmp_path / "f16", dtype="f16", external_data=True)
    assert (out / "model.onnx.data").is_file()
    lm = OnnxCausalLM(out)
    assert lm.dtype == np.float16
    ids, mask, pos = _inputs(384, seed=1)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    got = _stepwise(lm, ids, mask, pos, prefill=6)
    valid = mask.bool().numpy()
    err = np.abs(got - want)[valid].max()
    assert err < 5e-3 * np.abs(want).max() + 1e-2, err


@pytest.mark.timeout(3600)  # a 30-layer export takes minutes of CPU, many more on a loaded machine
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_smollm2_onnx_matches_lmstack(dtype, tmp_path, tmp_path_factory):
    """SmolLM2-135M-Instruct (imported from llama.cpp's Q4_1 file): ONNX logits vs lmstack fp32, greedy tokens."""
    from lmstack.tokenizer import Tokenizer

    src = smollm2_dir(tmp_path_factory)
    model = load_model(src, dtype="float32")
    tok = Tokenizer.from_dir(src)
    lm = OnnxCausalLM(export_onnx(src, tmp_path / "onnx", dtype=dtype), threads=2)
    err, want, gen, ref, same, n = _compare_on_prompt(model, lm, tok)
    print(f"\nSmolLM2 ONNX {dtype}: max |logit diff| {err:.2e} (logit range {np.abs(want).max():.1f}); "
          f"greedy tokens identical for {same}/{n}: {tok.decode(gen)!r}")
    if dtype == "f32":
        assert err < 1e-3 and gen == ref
    else:
        assert err < 0.5 and same >= 8


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_smollm2_quantized_onnx_matches_lmstack_quantized(dtype, tmp_path, tmp_path_factory):
    """SmolLM2-135M exported with --dtype int8 (from the float directory: quantized on the way) and int4 (an
    ``lmstack quantize`` group-64 directory): onnxruntime's MatMulNBits logits vs lmstack's quantized model,
    greedy tokens, file size against the f32 weights."""
    from lmstack.quant import load_quantized, quantize_checkpoint
    from lmstack.tokenizer import Tokenizer

    src = smollm2_dir(tmp_path_factory)
    qdir = quantize_checkpoint(src, tmp_path / "q", method=dtype, group_size=64)
    model = load_quantized(qdir)
    tok = Tokenizer.from_dir(src)
    out = export_onnx(src if dtype == "int8" else qdir, tmp_path / "onnx", dtype=dtype, group_size=64)
    lm = OnnxCausalLM(out, threads=2)
    err, want, gen, ref, same, n = _compare_on_prompt(model, lm, tok)
    size = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    f32 = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"\nSmolLM2 ONNX {dtype}: max |logit diff| vs lmstack {dtype} {err:.2e} (logit range "
          f"{np.abs(want).max():.1f}); greedy identical {same}/{n}: {tok.decode(gen)!r}; model.onnx {size / 1e6:.1f} MB "
          f"(f32 safetensors {f32 / 1e6:.1f} MB, lmstack {dtype} {sum(f.stat().st_size for f in qdir.glob('*.safetensors')) / 1e6:.1f} MB)")
    assert err < 1e-3 * np.abs(want).max() and gen == ref
    # the float embedding table (113 MB of SmolLM2's 540) stays; int8 reads ~1 byte, int4 g64 ~0.63 per weight
    assert size < (0.5 if dtype == "int8" else 0.42) * f32
