"""Fixtures for the eval tests: a tiny byte-level BPE tokenizer (HF ``tokenizers``) saved with a chat
template, and a 2-layer 64-wide random Llama saved by ``transformers`` with that tokenizer beside it, so
both lmstack and ``transformers.AutoTokenizer`` / lm-eval's ``hf`` backend can load the directory."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4; bos=1 eos=2 pad=0 (conftest)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Question: What is the answer? Answer: A B C D",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i)\n",
    "中国的首都是北京。水的沸点是一百摄氏度。语言模型为每一段文本分配一个概率。",
    "The river town woke slowly in the grey light of early spring, and the market was full of voices.",
] * 4


def make_tokenizer(out_dir: str | Path, vocab_size: int = 320) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE, "model_max_length": 256,
        "add_bos_token": False, "add_eos_token": False}))
    return out


def make_model_dir(path: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random HF model with the tokenizer above; returns the directory."""
    from tests.conftest import make_hf_model

    path = Path(path)
    make_tokenizer(path)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    make_hf_model(arch, path, seed=seed, vocab_size=vocab)
    return path


def one_thread():
    """Run a module's tiny-model tests on 1 intra-op thread and restore the previous count afterwards.

    A 2-layer 64-wide model gains nothing from 2 threads, and on a loaded machine OpenMP's spin-waiting makes
    a 64-token forward ~100x slower (1 s instead of 10 ms, measured with load average 11 on 2 cores)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
