"""Weight-only int8 / int4 inference linears and quantized checkpoints.

References: the quantization formulas written out in the tests (absmax int8 per row; min/max int4 per group),
a ``transformers`` model given the dequantized weights (what the quantized model must compute), and perplexity
of the real SmolLM2-135M-Instruct on held-out text (int8 within 1% of fp32).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmstack
from lmstack.cli import main
from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.hf_io import load_model
from lmstack.quant import (
    Int4PackedLinear, Int8PackedLinear, load_quantized, quantization_config, quantize_checkpoint, quantize_linears,
)
from tests.export_fixtures import VOCAB, smollm2_dir, tiny_model_dir


def _int8_reference(w):  # absmax per output row, round to nearest, [-127, 127]; an all-zero row stays zero
    s = w.abs().amax(1) / 127
    return torch.nan_to_num(torch.round(w / s[:, None]).clamp(-127, 127) * s[:, None])


def _int4_reference(w, g):  # per group of g inputs: 16 levels spanning [min, max], round to nearest
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            blk = w[r, c:c + g]
            lo, hi = blk.min(), blk.max()
            step = (hi - lo) / 15
            out[r, c:c + g] = lo + torch.round((blk - lo) / step).clamp(0, 15) * step
    return out


@pytest.mark.parametrize("kernel", ["1", "0"])  # PyTorch's packed kernel, and the dequantize-then-matmul path
def test_int8_and_int4_linears_match_the_formulas(monkeypatch, kernel):
    monkeypatch.setenv("LMSTACK_QUANT_KERNEL", kernel)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 128, generator=g) * 0.05)
    x = torch.randn(2, 3, 128, generator=g)
    w8 = _int8_reference(lin.weight.detach())
    q8 = Int8PackedLinear.from_linear(lin)
    torch.testing.assert_close(q8.dequantize(), w8, rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(q8(x), x @ w8.t() + lin.bias, rtol=1e-5, atol=1e-5)
    assert ((w8 - lin.weight).abs() <= lin.weight.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    for gs in (32, 64):
        w4 = _int4_reference(lin.weight.detach(), gs)
        q4 = Int4PackedLinear.from_linear(lin, gs)
        torch.testing.assert_close(q4.dequantize(), w4, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(q4(x), x @ w4.t() + lin.bias, rtol=1e-4, atol=1e-4)
        assert q4.weight.dtype == torch.uint8 and q4.weight.numel() == 48 * 128 // 2  # half a byte per weight


def test_quantize_linears_refuses_bad_group_sizes():
    from lmstack.model import build_model
    from lmstack.model.config import ModelConfig

    m = build_model(ModelConfig(vocab_size=64, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1), device="cpu")
    with pytest.raises(ConfigError, match="does not divide in_features 96 .* use 32"):
        quantize_linears(m, "int4", 64)
    with pytest.raises(ConfigError, match="48 is not supported"):
        quantize_linears(m, "int4", 48)
    with pytest.raises(ConfigError, match="int3"):
        quantize_linears(m, "int3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    tiny_model_dir("qwen2", d / "m")  # q/k/v biases, tied embeddings
    return d


@pytest.mark.parametrize("method,gs,head", [("int8", 64, "int8"), ("int4", 32, "int8"), ("int4", 32, "fp32")])
def test_quantized_checkpoint_equals_transformers_with_dequantized_weights(tiny, method, gs, head):
    import transformers

    out = quantize_checkpoint(tiny / "m", tiny / f"{method}-{head}", method=method, group_size=gs, lm_head=head)
    qc = quantization_config(out)
    assert qc["method"] == method and "model.layers.0.self_attn.q_proj" in qc["modules"]
    assert ("lm_head" in qc["modules"]) == (head == "int8") and len(qc["modules"]) == 2 * 7 + (head == "int8")
    assert qc.get("int8_modules", []) == (["lm_head"] if head == "int8" and method == "int4" else [])
    # the reference: the float model with each linear replaced by the formula's dequantized weight (lm_head:
    # its own int8 copy of the tied embedding, which stays float)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                w = mod.weight.detach()
                mod.weight.copy_(_int8_reference(w) if method == "int8" else _int4_reference(w, gs))
        if head == "int8":
            ref.lm_head.weight = torch.nn.Parameter(_int8_reference(ref.lm_head.weight.detach().clone()))
            assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()
    model = load_quantized(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8PackedLinear if method == "int8" else Int4PackedLinear)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    # served through the engine: greedy tokens equal the reference's
    prompt = ids[0, :8]
    with torch.no_grad():
        want = ref.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            pad_token_id=1)[0, 8:].tolist()
    got = lmstack.load(out, max_num_seqs=2).generate([prompt.tolist()], temperature=0, max_tokens=12,
                                                     ignore_eos=True)[0].outputs[0].token_ids
    assert list(got) == want
    float_bytes = (tiny / "m" / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < float_bytes


def test_quantize_cli_and_bad_checkpoints(tiny, tmp_path, capsys):
    assert main(["quantize", "--model", str(tiny / "m"), "--out", str(tmp_path / "q"), "--method", "int8"]) == 0
    assert quantization_config(tmp_path / "q")["method"] == "int8"
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny / "m"), "--out", str(tmp_path / "q4"), "--method", "int4",
                 "--group-size", "48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "48" in err[0] and not (tmp_path / "q4").exists()
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["modules"].append("model.layers.0.mlp.missing")
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="names module 'model.layers.0.mlp.missing'"):
        load_quantized(tmp_path / "q")
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not one lmstack loads"):
        lmstack.load(tmp_path / "q")


HELD_OUT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up to five "
    "books at a time, and each loan lasts three weeks. If a book is returned late, a small fee is charged for "
    "every day it is overdue. Children under twelve need a parent to sign their library card application. "
    "The reading room on the second floor is quiet, and phones must be switched to silent before entering. "
    "Free wireless internet is available throughout the building; ask at the front desk for the password."
)


def test_int8_perplexity_within_one_percent_of_fp32_on_smollm2(tmp_path_factory):
    from lmstack.tokenizer import Tokenizer

    src = smollm2_dir(tmp_path_factory)
    ids = torch.tensor([Tokenizer.from_dir(src).encode(HELD_OUT)])

    def ppl(model) -> float:  # exp of the mean next-token cross-entropy
        with torch.no_grad():
            logits = model(ids)[0, :-1]
        nll = -torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None]).mean()
        return math.exp(nll.item())

    model = load_model(src)
    base = ppl(model)
    quantize_linears(model, "int8")
    q8 = ppl(model)
    assert base < 60  # a real model on plain English
    assert abs(q8 / base - 1) < 0.01, (base, q8)
