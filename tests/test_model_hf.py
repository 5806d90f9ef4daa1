"""Logits parity with transformers for llama, qwen2, qwen3 and mistral (load and save)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from lmstack.errors import CheckpointError
from lmstack.model import KVCache, ModelConfig, load_model, preset, save_model
from tests.conftest import make_hf_model


def padded_batch(vocab: int = 256):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def hf_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def test_load_logits_match_transformers(hf_model_dir):
    arch, path, hf = hf_model_dir
    ids, mask, pos = padded_batch()
    ours = load_model(path, device="cpu", dtype="fp32")
    assert ours.config.model_type == arch
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=pos)
    want = hf_logits(hf, ids, mask, pos)
    valid = mask.bool()
    assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)


def test_save_loads_in_transformers(hf_model_dir, tmp_path):
    import transformers

    arch, path, hf = hf_model_dir
    ours = load_model(path, device="cpu", dtype="fp32")
    out = save_model(ours, tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__.lower().startswith(arch[:5])
    ids, mask, pos = padded_batch()
    assert_close(hf_logits(back, ids, mask, pos)[mask.bool()], hf_logits(hf, ids, mask, pos)[mask.bool()],
                 atol=1e-5, rtol=1e-5)


def test_kv_cache_incremental_matches_full_forward(hf_model_dir):
    arch, path, _ = hf_model_dir
    model = load_model(path, device="cpu", dtype="fp32")
    cfg = model.config
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos)
        cache = KVCache(cfg.num_hidden_layers, 3, cfg.num_key_value_heads, cfg.head_dim, 32, torch.float32,
                        torch.device("cpu"), cfg.sliding_window)
        cache.set_padding(mask[:, :12])
        a = model(ids[:, :12], position_ids=pos[:, :12], ctx=cache)
        cache.advance(12)
        outs = [a]
        for t in range(12, 20):
            cache.set_padding(mask[:, t:t + 1])
            outs.append(model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], ctx=cache))
            cache.advance(1)
    inc = torch.cat(outs, 1)
    assert_close(inc[mask.bool()], full[mask.bool()], atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf = make_hf_model("llama", tmp_path, rope_scaling=scaling)
    ours = load_model(tmp_path, device="cpu")
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=pos)
    assert_close(got[mask.bool()], hf_logits(hf, ids, mask, pos)[mask.bool()], atol=1e-4, rtol=1e-4)


def test_sharded_save_roundtrip(tmp_path):
    make_hf_model("qwen2", tmp_path / "src")
    m = load_model(tmp_path / "src")
    save_model(m, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m2 = load_model(tmp_path / "sharded")
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert_close(m2(ids), m(ids))


def test_bf16_load_dtype(tmp_path):
    make_hf_model("llama", tmp_path)
    m = load_model(tmp_path, dtype="bf16")
    assert m.dtype == torch.bfloat16


def test_presets_parameter_counts():
    from lmstack.model import build_model

    for name, lo, hi in [("tiny", 8e6, 14e6), ("small", 25e6, 40e6)]:
        cfg = preset(name)
        m = build_model(cfg, device="cpu")
        assert lo < m.num_parameters() < hi
        assert m.num_parameters() == cfg.num_parameters()
    assert 4.5e8 < preset("qwen2.5-0.5b").num_parameters() < 5.5e8


def test_config_roundtrip_through_transformers():
    import transformers

    cfg = ModelConfig(model_type="qwen3", qk_norm=True, head_dim=32, vocab_size=300, hidden_size=64,
                      num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96)
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    back = ModelConfig.from_hf(hf.to_dict())
    for f in ("vocab_size", "hidden_size", "head_dim", "num_key_value_heads", "qk_norm", "rope_theta",
              "tie_word_embeddings", "model_type"):
        assert getattr(back, f) == getattr(cfg, f), f


# ------------------------------------------------------------------ bad input
def test_missing_dir_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match=r'gpt_neox.*supported: llama, qwen2, qwen3, mistral'):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor(tmp_path):
    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_model(tmp_path)


def test_corrupt_safetensors_is_clear(tmp_path):
    make_hf_model("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)
