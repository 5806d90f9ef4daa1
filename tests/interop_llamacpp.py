"""llama.cpp itself (through llama-cpp-python) runs lmstack's GGUF exports: every prompt position's logits close to
lmstack's (tolerance per dtype) and greedy tokens equal, for every architecture at f32 / f16 / q8_0 / q4_0, and for
the real SmolLM2-135M. Slow to build, so not part of ``make test``: run ``make test-interop`` (it installs
llama-cpp-python into the venv once). The file name does not match ``test_*.py`` on purpose: the default collection
leaves it out; naming it on the command line runs it. ``-s`` prints the measured differences (docs/export.md).

The lmstack side reads the same GGUF file back (``lmstack.export.import_gguf``: the quantized weights dequantized),
so both sides hold the same weights and the difference is the arithmetic: llama.cpp's CPU matmuls convert the
activations to f16 for f16 weights and quantize them to Q8 blocks for q8_0 / q4_0 weights, which lmstack does not.
Tolerances, relative to the largest |logit|: f32 1e-4, f16 5e-3, q8_0 / q4_0 3e-2.
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

REL_TOL = {"f32": 1e-4, "f16": 5e-3, "q8_0": 3e-2, "q4_0": 3e-2}
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
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0)
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
        assert same == N_NEW
    if dtype == "f32":  # and the original transformers model (the file is f32: nothing was rounded)
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0].numpy()
        got, _ = _llama_cpp(f, prompt, 0)
        np.testing.assert_allclose(got[:, :VOCAB], want, atol=1e-4 * np.abs(want).max(), rtol=0)


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
