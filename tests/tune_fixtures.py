"""Fixtures for the fine-tuning tests: a tiny random model directory with a trained ChatML tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import make_hf_model

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Name a primary color. Red is a primary color. Blue and yellow are too.",
    "Translate hello to French. Bonjour. Translate thanks: merci.",
    "Add two and three. Two plus three is five. Four plus four is eight.",
    "You are a helpful assistant. Answer briefly and politely.",
] * 4
VOCAB = 320


def make_model_dir(path: Path, arch: str = "qwen2", seed: int = 0, **kw) -> Path:
    """A 2-layer, 64-wide random model of ``arch`` whose directory also holds a ChatML BPE tokenizer."""
    from lmstack.tokenizer import train_tokenizer

    path = Path(path)
    tok = train_tokenizer(CORPUS, vocab_size=VOCAB, out_dir=path, show_progress=False)
    make_hf_model(arch, path, seed=seed, vocab_size=VOCAB, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


SFT_ROWS = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Translate hello to French."},
                  {"role": "assistant", "content": "Bonjour."},
                  {"role": "user", "content": "And thanks?"},
                  {"role": "assistant", "content": "Merci."}]},
    {"conversations": [{"from": "human", "value": "Add two and three."}, {"from": "gpt", "value": "Five."}]},
]

PAIR_ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Red."},
    {"prompt": "Name a primary color.", "chosen": "Blue.", "rejected": "Eight."},
    {"prompt": [{"role": "user", "content": "Add two and three."}], "chosen": [{"role": "assistant", "content": "Five."}],
     "rejected": [{"role": "assistant", "content": "Bonjour."}]},
    {"prompt": "Translate hello to French.", "chosen": "Bonjour.", "rejected": "Five."},
]
