"""Issue 18's sweep: for every config field of each supported architecture in the installed transformers, a
random tiny model with that field set to a non-default value either matches transformers' logits (and saves
back to a directory transformers reads to the same logits) or is refused, by loading and by ``lmstack info``
alike, with one line. The refused set is asserted exactly, so a field cannot slip from "honoured" to "refused"
(or the reverse) unnoticed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from lmstack.errors import LmstackError
from lmstack.model import load_model, save_model
from lmstack.model.info import model_info
from tests.model_fixtures import ALL_ARCHS, make_model, tiny_config

# One non-default value per field name (valid for transformers; chosen to change the numbers where the field can).
VALUES = {
    "vocab_size": 300, "hidden_size": 96, "intermediate_size": 80, "num_hidden_layers": 3,
    "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_act": "gelu", "max_position_embeddings": 12,
    "initializer_range": 0.5, "rms_norm_eps": 0.05, "use_cache": False, "pad_token_id": 5, "bos_token_id": 6,
    "eos_token_id": [7, 8], "pretraining_tp": 2, "tie_word_embeddings": "flip",
    "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                        "rope_theta": 500.0},
    "attention_bias": True, "attention_dropout": 0.25, "mlp_bias": True, "head_dim": 16,
    "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1,
    "layer_types": ["sliding_attention", "sliding_attention"],  # with a window (transformers needs one)
    "num_experts_per_tok": 3, "num_local_experts": 6, "num_experts": 6, "output_router_logits": True,
    "router_aux_loss_coef": 0.5, "router_jitter_noise": 0.3, "decoder_sparse_step": 2,
    "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40, "norm_topk_prob": "flip",
    "mlp_only_layers": [0], "qkv_bias": False,
}
# Field combinations that matter together (issue 18: Qwen2 with use_sliding_window and max_window_layers).
COMBOS = {
    "window-all-layers": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0},
    "window-some-layers": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    "window-explicit-types": {"use_sliding_window": True, "sliding_window": 5,
                              "layer_types": ["sliding_attention", "full_attention"]},
}
# What lmstack refuses, exactly: non-SwiGLU activations, and a mix of sliding-window and full-attention layers.
# (Qwen2-MoE's rule: odd layers below max_window_layers slide, so use_sliding_window alone mixes them.)
REFUSED = {(a, "hidden_act") for a in ALL_ARCHS} | {
    (a, c) for a in ("qwen2", "qwen3", "qwen2_moe") for c in ("window-some-layers", "window-explicit-types")} | {
    ("qwen2_moe", "use_sliding_window")}


def _fields(arch: str) -> list[str]:
    import transformers

    cls = type(tiny_config(arch))
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    return [f.name for f in dataclasses.fields(cls) if f.name not in base]


def _cases():
    for arch in ALL_ARCHS:
        for name in _fields(arch):
            yield arch, name
        for combo in COMBOS:
            if "use_sliding_window" in _fields(arch):
                yield arch, combo


def _overrides(arch: str, case: str) -> dict:
    if case in COMBOS:
        return dict(COMBOS[case])
    v = VALUES[case]  # a KeyError here means transformers grew a field: give it a value above
    if v == "flip":
        v = not getattr(tiny_config(arch), case)
    if case == "layer_types":
        return {case: v, "use_sliding_window": True, "sliding_window": 5}
    return {case: v}


CASES = list(_cases())


@pytest.mark.slow
@pytest.mark.parametrize("arch,case", CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_field_is_honoured_or_refused(arch, case, tmp_path):
    import transformers

    hf = make_model(arch, tmp_path / "hf", **_overrides(arch, case))
    if (arch, case) in REFUSED:
        for fn in (load_model, model_info):
            with pytest.raises(LmstackError) as e:
                fn(tmp_path / "hf")
            msg = str(e.value)
            assert "\n" not in msg and str(tmp_path / "hf") in msg
        return
    model_info(tmp_path / "hf")  # info accepts what load accepts
    ours = load_model(tmp_path / "hf", device="cpu", dtype="fp32")
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
    assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)
    back = transformers.AutoModelForCausalLM.from_pretrained(save_model(ours, tmp_path / "out"),
                                                             dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert_close(again[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_sweep_covers_every_field():
    """Every field of every architecture has a value to try (new transformers fields fail here, not silently)."""
    for arch in ALL_ARCHS:
        assert set(_fields(arch)) <= set(VALUES), arch
    assert len(CASES) > 150
