"""Fixtures for the engine / generation tests: tiny model directories with and without a tokenizer.

Weights use ``initializer_range=0.2`` (not 0.02) so the random models have peaked next-token
distributions: greedy argmax then has a margin far above fp32 noise and token-exact comparisons with
``transformers`` are meaningful rather than tie-breaking lotteries.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "Language models predict the next token given the previous tokens.",
    "Serving many requests at once needs continuous batching and a paged KV cache.",
    "机器学习是人工智能的一个分支。 café naïve 🙂 emoji",
    "def add(a, b):\n    return a + b\n",
] * 20

INIT = 0.2


def hf_model(arch: str, path: str | Path, **kw):
    """A token-id-only model directory (no tokenizer); returns the transformers model."""
    from tests.conftest import make_hf_model

    return make_hf_model(arch, path, initializer_range=INIT, **kw)


def text_model_dir(path: str | Path, arch: str = "qwen2", seed: int = 0):
    """A ~320-token byte-level BPE (ChatML template) + a random 2-layer model; returns (path, hf_model)."""
    from lmstack.tokenizer import train_tokenizer
    from tests.conftest import make_hf_model

    path = Path(path)
    tok = train_tokenizer(CORPUS, vocab_size=320, out_dir=path, show_progress=False)
    model = make_hf_model(arch, path, seed=seed, vocab_size=tok.vocab_size, initializer_range=INIT,
                          eos_token_id=tok.token_to_id("<|im_end|>"),
                          bos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=tok.token_to_id("<|pad|>"))
    return path, model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers greedy continuation of ``prompt`` (exactly n tokens, EOS ignored)."""
    import torch

    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_is_greedy(model, prompt: list[int], out: list[int]) -> list[int]:
    """transformers' argmax after prompt + out[:i] for every i, from ONE teacher-forced forward pass.

    Equal to ``out`` exactly when ``out`` is transformers' greedy continuation (each token is the argmax
    given the same prefix); much cheaper than ``generate`` for tests that only need the reference."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]
    return logits.argmax(-1).tolist()
