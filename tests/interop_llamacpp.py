"""llama.cpp itself (through llama-cpp-python) runs lmstack's GGUF exports: every prompt position's logits close to
lmstack's (tolerance per dtype) and greedy tokens equal, for every architecture at f32 / f16 / q8_0 / q4_0, and for
the real SmolLM2-135M. Slow to build, so not part of ``make test``: run ``make test-interop`` (it installs
llama-cpp-python into the venv once). The file name does not match ``test_*.py`` on purpose: the default collection
leaves it out; naming it on the command line runs it. ``-s`` prints the measured differences (docs/export.md).

The lmstack side reads the same GGUF file back (``lmstack.export.import_gguf``: the quantized weights dequantized),
so both sides hold the same weights and the difference is the arithmetic: llama.cpp's CPU matmuls convert the
activations to f16 for f16 weights and quantize them to Q8 blocks for q8_0 / q4_0 weights, which lmstack does not.
llama.cpp's KV cache is set to f32 (its default f16 alone moves the logits by ~1e-3 of their range). Tolerances,
relative to the largest |logit|: f32 1e-5, f16 5e-3, q8_0 / q4_0 8e-2 (measured in docs/export.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmstack
from lmstack.export import export_gguf, import_gguf
from lmstack.model.hf_io import load_model
from tests.conftest import ARCHS
from tests.export_fixtures import VOCAB, smollm2_dir, tiny_model_dir

llama_cpp = pytest.importorskip("llama_cpp")  # make test-interop installs it; never skipped there

REL_TOL = {"f32": 1e-5, "f16": 5e-3, "q8_0": 8e-2, "q4_0": 8e-2}
GGML_F32 = 0  # llama.cpp's KV cache is f16 by default (1e-3 of the logits on its own): f32 isolates the weights
N_NEW = 32


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"lcpp_{request.param}")
    # weights large enough that the logits are decisive (no near-ties for the greedy comparison)
    ref = tiny_model_dir(request.param, d / "m", initializer_range=0.2,
                         **({"sliding_window": 64} if request.param == "mistral" else {}))
    return request.param, d, ref


def _llama_cpp(path, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """(logits at every prompt position (T, vocab), n greedy tokens) from llama.cpp."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0,
                          type_k=GGML_F32, type_v=GGML_F32)
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)])
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return logits, out


def _compare(f, tmp, prompt: list[int], dtype: str, label: str) -> tuple[float, int]:
    got_logits, got = _llama_cpp(f, prompt, N_NEW)
    back = import_gguf(f, tmp / f"back-{dtype}")
    with torch.no_grad():
        want_logits = load_model(back, dtype="float32")(torch.tensor([prompt]))[0].numpy()
    v = want_logits.shape[-1]
    err = float(np.abs(got_logits[:, :v] - want_logits).max())
    scale = float(np.abs(want_logits).max())
    llm = lmstack.load(str(back), max_num_seqs=1)
    want = list(llm.generate([prompt], temperature=0, max_tokens=N_NEW, ignore_eos=True)[0].outputs[0].token_ids)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), N_NEW)
    print(f"\n{label} {dtype}: max |logit diff| llama.cpp vs lmstack {err:.2e} (max |logit| {scale:.1f}, "
          f"relative {err / scale:.1e}); greedy tokens identical for {same}/{N_NEW}")
    assert err <= REL_TOL[dtype] * scale, (dtype, err, scale)
    return err / scale, same


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_cpp_logits_and_greedy_tokens_equal_lmstack(model, dtype, tmp_path):
    arch, d, ref = model
    f = export_gguf(d / "m", tmp_path / f"m.{dtype}.gguf", dtype=dtype)
    prompt = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    _, same = _compare(f, tmp_path, prompt, dtype, arch)
    if dtype in ("f32", "f16"):
        assert same == N_NEW  # quantized tiny random models have near-ties: their greedy runs are printed, not asserted
    if dtype == "f32":  # and the original transformers model (the file is f32: nothing was rounded)
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0].numpy()
        got, _ = _llama_cpp(f, prompt, 0)
        np.testing.assert_allclose(got[:, :VOCAB], want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("dtype,ftype", [("q8_0", 7), ("q4_0", 2)])
def test_quantized_blocks_equal_llama_cpp_quantizer(model, dtype, ftype, tmp_path):
    """llama.cpp's own quantizer (llama_model_quantize) applied to lmstack's f32 export writes the same blocks as
    lmstack's q8_0 / q4_0 export, byte for byte (but an untied q4_0 token_embd, which lmstack keeps at Q8_0)."""
    import ctypes

    from gguf import GGUFReader

    arch, d, _ = model
    f32 = export_gguf(d / "m", tmp_path / "m.f32.gguf", dtype="f32")
    ours = export_gguf(d / "m", tmp_path / f"m.{dtype}.gguf", dtype=dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype  # LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
    theirs = tmp_path / f"llama.cpp.{dtype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a = {t.name: (t.tensor_type.name, bytes(t.data)) for t in GGUFReader(str(ours)).tensors}
    b = {t.name: (t.tensor_type.name, bytes(t.data)) for t in GGUFReader(str(theirs)).tensors}
    assert set(a) == set(b)
    differ = sorted(k for k in a if a[k] != b[k])
    assert differ in ([], ["token_embd.weight"] if dtype == "q4_0" else []), differ
    if differ:  # llama.cpp quantizes an untied embedding table to Q4_0; lmstack keeps it at Q8_0
        assert (a[differ[0]][0], b[differ[0]][0]) == ("Q8_0", "Q4_0")


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smollm2_export_runs_in_llama_cpp(dtype, tmp_path, tmp_path_factory):
    """The real SmolLM2-135M-Instruct (imported from llama.cpp's own Q4_1 file), exported back by lmstack."""
    from lmstack.tokenizer import Tokenizer

    src = smollm2_dir(tmp_path_factory)
    f = export_gguf(src, tmp_path / f"smollm2.{dtype}.gguf", dtype=dtype)
    tok = Tokenizer.from_dir(src)
    prompt = tok.encode("The capital of France is Paris. The capital of Germany is", add_special_tokens=False)
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=256, n_threads=2, verbose=False)
    assert llm.tokenize("The capital of France is Paris. The capital of Germany is".encode(), add_bos=False,
                        special=False) == prompt  # llama.cpp's tokenizer reads the exported vocabulary the same way
    del llm
    _, same = _compare(f, tmp_path, prompt, dtype, "SmolLM2")
    assert same >= 8
