"""ONNX export with a KV-cache interface, run by onnxruntime, and ``export --adapter`` (GGUF and ONNX).

References: ``transformers`` + ``peft`` compute the logits of base + LoRA adapter (no lmstack code on that side);
onnxruntime runs the exported graph; the greedy reference is lmstack's model re-run on the whole sequence
each step (no cache), so the ONNX cache path is checked against a path that has none.
Exports are the slow part (~15-40 s on 2 shared cores), so the module makes one: f32 with an adapter, through the
CLI. Every architecture, f16, external weight data and the real SmolLM2 are in ``tests/interop_onnx.py``
(``make test-interop``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmstack.errors import CheckpointError, ConfigError
from tests.export_fixtures import tiny_model_dir

ARCH = "qwen2"  # q/k/v biases, GQA (4 heads, 2 KV heads), tied embeddings: the most parts a merge can miss
INIT = 0.2  # weights large enough that greedy decoding does not repeat one token


def _peft_adapter(base_dir, out_dir):
    """A LoRA adapter saved by peft itself (random A and B) on the transformers model; returns peft's model."""
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # an update the logits show clearly
    pm.save_pretrained(out_dir)
    return pm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lmstack.cli import main

    d = tmp_path_factory.mktemp("onnx")
    tiny_model_dir(ARCH, d / "model", initializer_range=INIT)
    pm = _peft_adapter(d / "model", d / "adapter")
    assert main(["export", "--model", str(d / "model"), "--adapter", str(d / "adapter"), "--format", "onnx",
                 "--out", str(d / "onnx")]) == 0
    return d, pm


def _inputs(T=9, pad=3, seed=0):
    """Two rows, the first left-padded by ``pad``: ids, attention mask, position ids (transformers' rule)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def test_export_dir_holds_graph_config_and_tokenizer(setup):
    d, _ = setup
    names = sorted(p.name for p in (d / "onnx").iterdir())
    assert names == ["config.json", "genai_config.json", "generation_config.json", "model.onnx", "tokenizer.json",
                     "tokenizer_config.json"]
    import onnx

    g = onnx.load(str(d / "onnx" / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim] for v in [*g.input, *g.output]}
    assert dims["input_ids"] == ["batch", "sequence_length"]
    assert dims["attention_mask"] == ["batch", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence_length", 16]
    assert dims["logits"] == ["batch", "sequence_length", 384]
    assert dims["present.0.key"] == ["batch", 2, "total_sequence_length", 16]
    assert [v.name for v in g.input][3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    cfg = json.loads((d / "onnx" / "config.json").read_text())
    assert cfg["model_type"] == ARCH
    # onnxruntime-genai's config names exactly the graph's inputs / outputs and the model's sizes
    gc = json.loads((d / "onnx" / "genai_config.json").read_text())["model"]
    dec = gc["decoder"]
    L = cfg["num_hidden_layers"]
    ins = {dec["inputs"][k] for k in ("input_ids", "attention_mask", "position_ids")}
    ins |= {dec["inputs"][k] % i for k in ("past_key_names", "past_value_names") for i in range(L)}
    outs = {dec["outputs"]["logits"]} | {dec["outputs"][k] % i for k in ("present_key_names", "present_value_names")
                                         for i in range(L)}
    assert ins == {v.name for v in g.input} and outs == {v.name for v in g.output}
    assert (d / "onnx" / dec["filename"]).is_file() and gc["type"] == "qwen2" and gc["vocab_size"] == 384
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (L, cfg["num_attention_heads"], cfg["num_key_value_heads"], 16, cfg["hidden_size"])


def test_prefill_and_cached_decode_equal_peft_logits(setup):
    """The merged ONNX graph in onnxruntime == transformers + peft (base + adapter, unmerged), on a left-padded
    batch: prefill of 6 tokens, then two single-token steps that feed ``present`` back as ``past``."""
    from lmstack.export.onnx_runtime import OnnxCausalLM

    d, pm = setup
    ids, mask, pos = _inputs()
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    lm = OnnxCausalLM(d / "onnx")
    got, past = lm.forward(ids[:, :6].numpy(), mask[:, :6].numpy(), pos[:, :6].numpy(), lm.empty_past(2))
    steps = [got]
    for t in (6, 7, 8):
        got, past = lm.forward(ids[:, t:t + 1].numpy(), mask[:, :t + 1].numpy(), pos[:, t:t + 1].numpy(), past)
        steps.append(got)
    got = np.concatenate(steps, 1)
    valid = mask.bool().numpy()
    assert past[0].shape == (2, 2, 9, 16)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    with torch.no_grad():  # the adapter changes the logits: the merge is not a no-op
        with pm.disable_adapter():
            base = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    assert np.abs(base - ref)[valid].max() > 0.1


def test_greedy_generation_equals_lmstack(setup):
    """OnnxCausalLM.generate (prefill + cached steps, left-padded batch) == lmstack base + LoRA modules, re-run on
    the whole sequence each step."""
    from lmstack.export.onnx_runtime import OnnxCausalLM
    from lmstack.model.hf_io import load_model
    from lmstack.tune.adapters import load_adapter

    d, _ = setup
    model = load_model(d / "model", dtype="float32")
    load_adapter(model, d / "adapter")
    prompts, n = [[5, 6, 7, 8, 9], [10, 11]], 12
    want = []
    for p in prompts:
        x = list(p)
        for _ in range(n):
            with torch.no_grad():
                x.append(int(model(torch.tensor([x]))[0, -1].argmax()))
        want.append(x[len(p):])
    assert all(len(set(w)) > 3 for w in want)  # not one repeated token
    lm = OnnxCausalLM(d / "onnx")
    assert lm.generate(prompts, n) == want
    stop = want[0][4]
    got = lm.generate(prompts, n, eos_token_id=stop)
    assert got[0] == want[0][:want[0].index(stop) + 1]
    assert got[1] == (want[1][:want[1].index(stop) + 1] if stop in want[1] else want[1])


def test_errors_are_one_line(setup, tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.export.onnx_export import export_onnx
    from lmstack.export.onnx_runtime import OnnxCausalLM

    d, _ = setup
    m = str(d / "model")
    cases = [
        (["--format", "onnx", "--dtype", "q8_0", "--out", str(tmp_path / "o")], "q8_0"),
        (["--format", "onnx", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")], "adapter_config.json"),
        (["--format", "gguf", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")], "adapter"),
        (["--format", "onnx", "--name", "x", "--out", str(tmp_path / "o")], "--name"),
    ]
    for args, needle in cases:
        capsys.readouterr()
        assert main(["export", "--model", m, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (args, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary merge left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="writes a directory"):
        export_onnx(m, tmp_path / "file")
    with pytest.raises(CheckpointError, match="not found"):
        OnnxCausalLM(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.onnx").write_bytes(b"\x00not a graph")
    with pytest.raises(CheckpointError, match="onnxruntime cannot load"):
        OnnxCausalLM(tmp_path / "bad")
    lm = OnnxCausalLM(d / "onnx")
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        lm.generate([[1, 384]], 2)
    with pytest.raises(ConfigError, match="at least one token"):
        lm.generate([[]], 2)


def test_moe_and_dynamic_rope_refused(tmp_path):
    from lmstack.export.onnx_export import check_exportable
    from lmstack.model import ModelConfig, Transformer

    base = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    with torch.device("meta"):
        moe = Transformer(ModelConfig(**{**base, "model_type": "mixtral", "num_experts": 2, "num_experts_per_tok": 1}))
        dyn = Transformer(ModelConfig(**base, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        check_exportable(moe)
    with pytest.raises(ConfigError, match="dynamic-NTK"):
        check_exportable(dyn)


@pytest.mark.parametrize("layout", ["peft", "lmstack"])
def test_gguf_export_with_adapter_equals_base_plus_adapter(setup, tmp_path, layout):
    """GGUF f32 with the adapter merged, read back by lmstack's importer == base + adapter before merging
    (peft's own model for peft's layout; lmstack's LoRA modules for an adapter lmstack saved)."""
    from lmstack.export import export_gguf, import_gguf
    from lmstack.model.hf_io import load_model
    from lmstack.tune.adapters import save_lora_adapter
    from lmstack.tune.lora import LoraSpec, apply_lora

    d, pm = setup
    ids, mask, pos = _inputs(seed=2)
    if layout == "peft":
        adapter = d / "adapter"
        with torch.no_grad():
            ref = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    else:
        adapter = tmp_path / "own"
        model = load_model(d / "model", dtype="float32")
        spec = LoraSpec(r=2, alpha=4.0, target_modules=["k_proj", "up_proj", "lm_head"])
        apply_lora(model, spec)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        save_lora_adapter(model, adapter, spec, str(d / "model"))
        with torch.no_grad():
            ref = model(ids, attention_mask=mask)
    f = export_gguf(d / "model", tmp_path / "m.gguf", dtype="f32", adapter=adapter)
    merged = load_model(import_gguf(f, tmp_path / "back"), dtype="float32")
    with torch.no_grad():
        got = merged(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
