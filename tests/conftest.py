"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers and saved locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")

import pytest
import torch

torch.set_num_threads(2)


def pytest_configure(config):
    """Build the compiled CPU decode kernel (lmstack/kernels) once, before any test: the first engine of the
    session would otherwise pay the ~15-30 s build inside a test, and CLI / server subprocesses find it cached."""
    from lmstack.kernels import load_cpu_decode

    load_cpu_decode()


ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_hf_config(arch: str, **kw):
    """A 2-layer, 64-wide config of the given architecture (GQA: 4 heads, 2 kv heads); ``kw`` overrides any
    field (benchmarks/gpu.py builds its larger models with it)."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    per_arch = {"llama": (transformers.LlamaConfig, dict(rope_theta=10000.0, tie_word_embeddings=False)),
                "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=True)),
                "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
                "mistral": (transformers.MistralConfig, dict(sliding_window=8, tie_word_embeddings=False))}
    if arch not in per_arch:
        raise ValueError(arch)
    cls, defaults = per_arch[arch]
    return cls(**{**common, **defaults, **kw})  # kw overrides the shared and the per-architecture defaults


def make_hf_model(arch: str, path, seed: int = 0, **kw):
    """Build a random transformers model, save it under ``path`` and return it (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases, so the qwen2 q/k/v bias is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            if "norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(params=ARCHS)
def hf_model_dir(request, tmp_path_factory):
    """(arch, path, transformers model) for each supported architecture."""
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    model = make_hf_model(request.param, path)
    return request.param, path, model


@pytest.fixture(scope="module")
def kb():
    """The shipped Larkspur Home knowledge base (recipes/data/shop)."""
    from lmstack.apps.support import load_kb

    return load_kb()


@pytest.fixture(scope="module")
def retriever(kb, tmp_path_factory):
    """A BM25 retrieval index over the shop's knowledge base, FAQ training questions searchable."""
    from lmstack.apps.support.retrieval import build_kb_index, open_kb_retriever

    path = tmp_path_factory.mktemp("rag") / "index.sqlite"
    build_kb_index(kb, path, faq_keywords=True)
    return open_kb_retriever(path)
