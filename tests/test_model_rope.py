"""RoPE scalings against transformers on tiny random models: YaRN (defaults, explicit attention factor, mscale
pair, no truncation), dynamic NTK (inside and past max_position_embeddings), linear; loading refuses the rest."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from lmstack.errors import CheckpointError
from lmstack.model import load_model, save_model
from tests.conftest import make_hf_model
from tests.test_model_hf import hf_logits, padded_batch

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
CASES = [  # (arch, rope_parameters, other config fields)
    ("qwen2", YARN, {}),
    ("llama", {**YARN, "attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2}, {}),
    ("qwen3", {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}, {}),
    ("mistral", {**YARN, "truncate": False, "factor": 3.0}, {}),
    # positions 0..19 past max_position_embeddings 12: transformers rescales the base for this pass
    ("qwen2", {"rope_type": "dynamic", "factor": 3.0}, {"max_position_embeddings": 12}),
    ("llama", {"rope_type": "linear", "factor": 2.5}, {}),
]


def _parity(arch, rope, tmp_path, **kw):
    hf = make_hf_model(arch, tmp_path, rope_parameters={**rope, "rope_theta": 10000.0}, **kw)
    ours = load_model(tmp_path, device="cpu", dtype="fp32")
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=pos)
    want = hf_logits(hf, ids, mask, pos)
    assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)
    return ours, hf, got


@pytest.mark.parametrize("arch,rope,kw", CASES, ids=[f"{a}-{r['rope_type']}-{i}" for i, (a, r, _) in enumerate(CASES)])
def test_scaled_rope_matches_transformers(arch, rope, kw, tmp_path):
    ours, _, got = _parity(arch, rope, tmp_path, **kw)
    assert ours.config.rope_scaling["rope_type"] == rope["rope_type"]
    # the scaling changes the numbers: the same weights without it give other logits
    plain = load_model(tmp_path, device="cpu", dtype="fp32")
    plain.config.rope_scaling = None
    plain._inv_freq.clear()
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        assert (plain(ids, attention_mask=mask, position_ids=pos) - got).abs().max() > 1e-3


def test_dynamic_ntk_within_max_positions_is_plain_rope(tmp_path):
    """Below max_position_embeddings dynamic NTK leaves RoPE as it is (in both libraries)."""
    ours, _, got = _parity("llama", {"rope_type": "dynamic", "factor": 2.0}, tmp_path)
    ours.config.rope_scaling = None
    ours._inv_freq.clear()
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask, position_ids=pos), got)


def test_yarn_save_roundtrip_in_transformers(tmp_path):
    import transformers

    _, hf, _ = _parity("qwen2", YARN, tmp_path / "src")
    out = save_model(load_model(tmp_path / "src"), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    ids, mask, pos = padded_batch()
    assert_close(hf_logits(back, ids, mask, pos)[mask.bool()], hf_logits(hf, ids, mask, pos)[mask.bool()])


@pytest.mark.parametrize("rope", [{"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 8},
                                  {"rope_type": "default", "partial_rotary_factor": 0.5}])
def test_unsupported_rope_refused_by_load_and_info(rope, tmp_path):
    from lmstack.model.info import model_info

    make_hf_model("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for fn in (load_model, model_info):
        with pytest.raises(CheckpointError) as e:
            fn(tmp_path)
        assert "\n" not in str(e.value) and ("longrope" in str(e.value) or "partial_rotary" in str(e.value))
