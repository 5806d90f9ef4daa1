"""llama.cpp itself (through llama-cpp-python) runs lmstack's GGUF exports: greedy tokens equal lmstack's for 32
tokens at f32 / f16 / q8_0, logits close at f32. Slow to build, so not part of ``make test``: run
``make test-interop`` (it installs llama-cpp-python into the venv once). The file name does not match
``test_*.py`` on purpose: the default collection leaves it out; naming it on the command line runs it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmstack
from lmstack.export import export_gguf
from tests.conftest import ARCHS
from tests.export_fixtures import VOCAB, tiny_model_dir

llama_cpp = pytest.importorskip("llama_cpp")  # make test-interop installs it; never skipped there


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"lcpp_{request.param}")
    ref = tiny_model_dir(request.param, d / "m", **({"sliding_window": 64} if request.param == "mistral" else {}))
    return request.param, d, ref


def _greedy_llama_cpp(path, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False, seed=0)
    llm.eval(prompt)
    first = np.array(llm.scores[len(prompt) - 1])  # logits after the prompt
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out, first


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_greedy_tokens_equal_lmstack(model, dtype):
    arch, d, ref = model
    f = export_gguf(d / "m", d / f"m.{dtype}.gguf", dtype=dtype)
    prompt = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    got, logits = _greedy_llama_cpp(f, prompt, 32)
    if dtype == "f32":
        with torch.no_grad():
            want_logits = ref(torch.tensor([prompt])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[:VOCAB], want_logits, atol=1e-3, rtol=0)
    # lmstack on the same file (imported back), the same greedy decode
    back = lmstack.load(f, max_num_seqs=1)
    want = back.generate([prompt], temperature=0, max_tokens=32, ignore_eos=True)[0].outputs[0].token_ids
    assert got == list(want)
