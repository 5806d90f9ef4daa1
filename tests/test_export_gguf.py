"""GGUF export and round trip on tiny random models of every architecture.

Independent references: ``gguf.GGUFReader`` (reads the file back), ``transformers``' own GGUF loader (it undoes
llama.cpp's Q/K permutation with its own code and must reproduce the original transformers model), and the
original tokenizer (ids of the re-imported tokenizer). llama.cpp itself is checked by ``make test-interop``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmstack.errors import CheckpointError, ConfigError
from lmstack.export import export_gguf, import_gguf
from lmstack.model.hf_io import load_model
from lmstack.tokenizer import Tokenizer
from tests.conftest import ARCHS
from tests.export_fixtures import TEXTS, VOCAB, tiny_model_dir
from tests.tokenizer_fixtures import corpus, write_llama3_dir, write_qwen2_dir

KW = {"mistral": {"sliding_window": 64}, "qwen3": {"head_dim": 128}}  # transformers' qwen3 GGUF reader assumes 128


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(f"gguf_{arch}")
    ref = tiny_model_dir(arch, d / "model", **KW.get(arch, {}))
    f32 = export_gguf(d / "model", d / "model.f32.gguf", dtype="f32")
    return arch, d, ref, f32


def _reader_tensors(path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    out = {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))))
           for t in r.tensors}
    return r, out


def _llama_cpp_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf row order for the llama architecture, written out here independently:
    within each head, row i of the first half and row i of the second half become rows 2i and 2i+1."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def test_reader_sees_every_tensor_and_key(exported):
    arch, d, ref, f32 = exported
    r, tensors = _reader_tensors(f32)
    cfg = ref.config
    gguf_arch = "llama" if arch in ("llama", "mistral") else arch
    field = {k: f.contents() for k, f in r.fields.items()}
    assert field["general.architecture"] == gguf_arch
    assert field[f"{gguf_arch}.block_count"] == cfg.num_hidden_layers
    assert field[f"{gguf_arch}.embedding_length"] == cfg.hidden_size
    assert field[f"{gguf_arch}.feed_forward_length"] == cfg.intermediate_size
    assert field[f"{gguf_arch}.attention.head_count"] == cfg.num_attention_heads
    assert field[f"{gguf_arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert field[f"{gguf_arch}.attention.key_length"] == (getattr(cfg, "head_dim", None)
                                                           or cfg.hidden_size // cfg.num_attention_heads)
    assert field[f"{gguf_arch}.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert field[f"{gguf_arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    tok = json.loads((d / "model" / "tokenizer.json").read_text())
    assert field["tokenizer.ggml.model"] == "gpt2"
    assert len(field["tokenizer.ggml.tokens"]) == VOCAB
    assert field["tokenizer.ggml.tokens"][:300] == [t for t, _ in sorted(
        {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}.items(),
        key=lambda kv: kv[1])][:300]
    assert field["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tcfg = json.loads((d / "model" / "tokenizer_config.json").read_text())
    assert field["tokenizer.chat_template"] == tcfg["chat_template"]
    assert field["tokenizer.ggml.tokens"][field["tokenizer.ggml.eos_token_id"]] == "<|endoftext|>"
    assert field["tokenizer.ggml.tokens"][field["tokenizer.ggml.eot_token_id"]] == "<|im_end|>"
    if arch == "mistral":
        assert field["llama.attention.sliding_window"] == 64

    sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    if arch == "qwen2":
        per_layer.update({f"self_attn.{p}_proj.bias": f"attn_{p}.bias" for p in "qkv"})
    if arch == "qwen3":
        per_layer.update({"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"})
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items()})
    assert set(tensors) == set(names.values())  # tied: no output.weight
    for hf, g in names.items():
        ty, arr = tensors[g]
        want = sd[hf]
        if arch in ("llama", "mistral") and (".q_proj." in hf or ".k_proj." in hf):
            heads = cfg.num_attention_heads if ".q_proj." in hf else cfg.num_key_value_heads
            want = _llama_cpp_rows(want, heads)
        assert ty == "F32", g
        np.testing.assert_array_equal(arr, want, err_msg=g)


def test_transformers_gguf_loader_reproduces_the_model(exported):
    import transformers

    arch, d, ref, f32 = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f32.name, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_round_trip_identical_tensors_and_greedy_tokens(exported):
    import lmstack

    arch, d, ref, f32 = exported
    back = import_gguf(f32, d / "reimported")
    a, b = load_file(str(d / "model" / "model.safetensors")), load_file(str(back / "model.safetensors"))
    a = {k: v for k, v in a.items() if not (ref.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from lmstack.model.config import ModelConfig

    cfg_a, cfg_b = ModelConfig.from_hf(d / "model"), ModelConfig.from_hf(back)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "sliding_window", "rope_theta",
                "rms_norm_eps", "attention_bias", "qk_norm", "max_position_embeddings"):
        assert getattr(cfg_a, key) == pytest.approx(getattr(cfg_b, key)), key
    prompt = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                            pad_token_id=0)[0, 12:].tolist()
    got = lmstack.load(back, max_num_seqs=1).generate([prompt[0].tolist()], temperature=0, max_tokens=20,
                                                      ignore_eos=True)[0].outputs[0].token_ids
    assert list(got) == want
    t0, t1 = Tokenizer.from_dir(d / "model"), Tokenizer.from_dir(back)
    for text in TEXTS:
        assert t1.encode(text) == t0.encode(text), text
        assert t1.decode(t1.encode(text)) == text
    assert t1.chat_template == t0.chat_template


@pytest.mark.parametrize("dtype,types,tol", [("f16", {"F16", "F32"}, 1e-3), ("q8_0", {"Q8_0", "F32"}, 0.02),
                                             ("q4_0", {"Q4_0", "Q8_0", "F32"}, 0.3)])
def test_quantized_exports_hold_close_values_and_1d_tensors_stay_f32(exported, dtype, types, tol):
    arch, d, ref, f32 = exported
    f = export_gguf(d / "model", d / f"model.{dtype}.gguf", dtype=dtype)
    _, q = _reader_tensors(f)
    _, full = _reader_tensors(f32)
    assert {ty for ty, _ in q.values()} == types
    for name, (ty, arr) in q.items():
        base = full[name][1]
        if arr.ndim == 1:
            assert ty == "F32" and np.array_equal(arr, base), name
        else:
            assert ty != "F32", name
            # block quantization error is bounded by a fraction of each row's largest magnitude
            err = np.abs(arr - base).max(axis=1)
            assert (err <= tol * np.abs(base).max(axis=1) + 1e-6).all(), (name, err.max())
    assert f.stat().st_size < f32.stat().st_size
    if dtype == "q8_0":  # the imported q8_0 model still predicts like the original
        back = load_model(import_gguf(f, d / "reimported_q8"))
        ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(back(ids), ref(ids).logits, rtol=0, atol=0.05)


def test_modelfile_has_chatml_template_and_stops(exported):
    arch, d, ref, f32 = exported
    text = f32.with_suffix(".Modelfile").read_text()
    assert f"FROM ./{f32.name}" in text
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|endoftext|>"' in text and 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.parametrize("style", ["llama3", "qwen2", "qwen2-regex"])
def test_tokenizer_styles_survive_the_round_trip(tmp_path, style):
    from tokenizers import Regex, Tokenizer as Backend, pre_tokenizers

    texts = corpus(20)
    tok_dir = tmp_path / "m"
    if style == "llama3":
        write_llama3_dir(tok_dir, texts)
    else:
        write_qwen2_dir(tok_dir, texts)
    if style == "qwen2-regex":  # Qwen2's published split: a name llama.cpp knows, no private key needed
        tj = json.loads((tok_dir / "tokenizer.json").read_text())
        bk = Backend.from_str(json.dumps(tj))
        bk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                                       r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        bk.save(str(tok_dir / "tokenizer.json"))
    n = Backend.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    make = __import__("tests.conftest", fromlist=["make_hf_model"]).make_hf_model
    make("qwen2", tok_dir, vocab_size=n + 5)  # 5 padding rows beyond the tokenizer
    f = export_gguf(tok_dir, tmp_path / "m.gguf", dtype="f32")
    from gguf import GGUFReader

    fields = {k: v.contents() for k, v in GGUFReader(str(f)).fields.items()}
    assert fields["tokenizer.ggml.pre"] == {"llama3": "llama-bpe", "qwen2": "llama-bpe", "qwen2-regex": "qwen2"}[style]
    assert ("tokenizer.lmstack.pre_regex" in fields) == (style != "qwen2-regex")
    assert fields["tokenizer.ggml.add_bos_token"] == (style == "llama3")
    assert fields["tokenizer.ggml.tokens"][-5:] == [f"[PAD{i}]" for i in range(n, n + 5)]
    assert fields["tokenizer.ggml.token_type"][-5:] == [5] * 5
    if style == "qwen2":
        i = fields["tokenizer.ggml.tokens"].index("<tool_call>")
        assert fields["tokenizer.ggml.token_type"][i] == 4  # user-defined, not control
    back = import_gguf(f, tmp_path / "back")
    t0, t1 = Tokenizer.from_dir(tok_dir), Tokenizer.from_dir(back)
    for text in [*TEXTS, "call <tool_call>{}</tool_call> now"]:
        assert t1.encode(text, add_special_tokens=True) == t0.encode(text, add_special_tokens=True), text
    assert t1.eos_token_id == t0.eos_token_id and t1.bos_token_id == t0.bos_token_id
    assert t1.chat_template == t0.chat_template


def test_export_refuses_bad_requests(tmp_path, exported):
    arch, d, ref, f32 = exported
    with pytest.raises(ConfigError, match="q2_k"):
        export_gguf(d / "model", tmp_path / "x.gguf", dtype="q2_k")
    with pytest.raises(CheckpointError, match="model directory not found"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    small = tmp_path / "small"
    tiny_model_dir("llama", small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 300  # fewer embedding rows than the tokenizer has ids
    (small / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(small / "model.safetensors"))
    sd = {k: (v[:300].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in sd.items()}
    from safetensors.torch import save_file

    save_file(sd, str(small / "model.safetensors"))
    with pytest.raises(CheckpointError, match="384 ids but the model's embedding has 300 rows"):
        export_gguf(small, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


def test_cli_export_writes_gguf_and_modelfile_and_refuses_unknown_format(exported, tmp_path, capsys):
    from lmstack.cli import main

    arch, d, ref, f32 = exported
    assert main(["export", "--model", str(d / "model"), "--format", "gguf", "--dtype", "q8_0",
                 "--out", str(tmp_path / "cli.gguf")]) == 0
    assert (tmp_path / "cli.gguf").stat().st_size > 0 and (tmp_path / "cli.Modelfile").is_file()
    capsys.readouterr()
    assert main(["export", "--model", str(d / "model"), "--format", "tflite", "--out", str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tflite" in err[0] and "gguf, onnx" in err[0] and not (tmp_path / "m.tflite").exists()
