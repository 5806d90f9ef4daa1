"""Model directories lmstack writes: generation_config.json lists every stop token the chat template uses
(so transformers' generate stops at the end of a turn where lmstack does), and `lmstack info` refuses what
loading refuses, with one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from lmstack.model import load_model, save_model
from tests.engine_fixtures import text_model_dir
from tests.model_fixtures import make_model


def test_generation_config_lists_chat_end_tokens(tmp_path):
    import transformers

    from lmstack.tokenizer import Tokenizer

    src, _ = text_model_dir(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    tok = Tokenizer.from_dir(src)
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    cfg["eos_token_id"] = eot  # what pretraining wrote before: only <|endoftext|>
    (src / "config.json").write_text(json.dumps(cfg))
    out = save_model(load_model(src), tmp_path / "out", tokenizer_dir=src)
    gen = transformers.GenerationConfig.from_pretrained(out)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eot in eos and im_end in eos
    assert "<|im_end|>" in str(tok.chat_template)  # the template ends turns with it
    # transformers' generate stops there: with <|im_end|> forced as the next token, one token comes out
    # (with only <|endoftext|> as eos it would emit <|im_end|> five times, the bug of issue 18)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = torch.tensor([tok.encode("Hello world")])
    bias = torch.full((hf.config.vocab_size,), -1e4)
    bias[im_end] = 0.0
    logits_processor = transformers.LogitsProcessorList([_Force(bias)])
    res = hf.generate(prompt, max_new_tokens=5, do_sample=False, logits_processor=logits_processor,
                      attention_mask=torch.ones_like(prompt))
    assert res[0, prompt.shape[1]:].tolist() == [im_end]


class _Force:
    def __init__(self, bias):
        self.bias = bias

    def __call__(self, input_ids, scores):
        return scores + self.bias


def test_generation_config_without_tokenizer_keeps_config_eos(tmp_path):
    make_model("llama", tmp_path / "src", eos_token_id=2)
    out = save_model(load_model(tmp_path / "src"), tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_info_cli_refuses_what_load_refuses(tmp_path):
    make_model("qwen2", tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "info", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmstack: ") and "max_window_layers" in lines[0]
    assert "Traceback" not in r.stderr
