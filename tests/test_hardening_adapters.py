"""Adapters never apply silently wrong: PEFT LoRA layouts (rank/alpha patterns, layer subsets, regex targets,
lm_head) match peft's logits; what lmstack cannot apply is refused with the real reason; an adapter applied to
a base it was not trained on is refused (or, with the override, applied with a warning)."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import CheckpointError
from lmstack.model import load_model
from lmstack.tune.adapters import load_adapter, save_lora_adapter
from lmstack.tune.lora import LoraSpec, apply_lora
from tests.conftest import make_hf_model

torch.set_num_threads(2)
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 200, 11], [8, 1, 64, 33, 250, 9, 12, 4]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = make_hf_model("llama", path)
    return path, hf


def _peft_adapter(base_dir, out, **cfg):
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    pm.save_pretrained(out)
    with torch.no_grad():
        return pm, pm(input_ids=IDS).logits


LAYOUTS = {
    "alpha_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          alpha_pattern={"down_proj": 40, r"layers\.1\.self_attn\.q_proj": 2}),
    "rank_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                         rank_pattern={"v_proj": 2, r"model\.layers\.0\.mlp\.up_proj": 7}),
    "layers_to_transform": dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "gate_proj"],
                                layers_to_transform=[1]),
    "layers_pattern": dict(r=4, lora_alpha=16, target_modules=["k_proj"], layers_to_transform=0,
                           layers_pattern="layers"),
    "regex_targets": dict(r=4, lora_alpha=8,
                          target_modules=r".*\.layers\.0\.(self_attn\.(q|k)_proj|mlp\.up_proj)"),
    "exclude_modules": dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj"]),
    "lm_head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_peft_layouts_match_peft(layout, llama, tmp_path):
    base_dir, _ = llama
    pm, ref = _peft_adapter(base_dir, tmp_path / "a", **LAYOUTS[layout])
    model = load_model(base_dir)
    with torch.no_grad():
        base = model(IDS)
    rt = load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        got = model(IDS)
    peft_targets = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                          if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    assert sorted(rt.wrapped_modules) == peft_targets
    assert (got - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg, reason", [
    (dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), "LoRA on embeddings is not supported"),
    (dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="lora_only"), "LoRA biases"),
    (dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unsupported_layouts_are_refused_with_the_reason(cfg, reason, llama, tmp_path):
    base_dir, _ = llama
    _peft_adapter(base_dir, tmp_path / "a", **cfg)  # peft itself accepts each
    with pytest.raises(CheckpointError, match=reason) as e:
        load_adapter(load_model(base_dir), tmp_path / "a")
    assert "different base model" not in str(e.value)


def _trained_adapter(base_dir, out):
    model = load_model(base_dir)
    spec = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_lora_adapter(model, out, spec, str(base_dir))
    with torch.no_grad():
        return model(IDS)


def test_adapter_on_another_base_is_refused_unless_allowed(llama, tmp_path, monkeypatch):
    base_dir, _ = llama
    ref = _trained_adapter(base_dir, tmp_path / "a")
    other = tmp_path / "other"
    make_hf_model("llama", other, seed=7)  # same architecture and shapes, other weights

    with pytest.raises(CheckpointError, match="trained on a different base model.*--allow-base-mismatch") as e:
        load_adapter(load_model(other), tmp_path / "a")
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="not trained on"):
        rt = load_adapter(load_model(other), tmp_path / "a", allow_base_mismatch=True)
    assert rt.wrapped_modules
    monkeypatch.setenv("LMSTACK_ALLOW_BASE_MISMATCH", "1")
    with pytest.warns(UserWarning):
        load_adapter(load_model(other), tmp_path / "a")
    monkeypatch.delenv("LMSTACK_ALLOW_BASE_MISMATCH")

    # its own base matches, in fp32 and in bf16 (dtype is not a different base)
    m = load_model(base_dir)
    load_adapter(m, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), ref)
    load_adapter(load_model(base_dir, dtype="bf16"), tmp_path / "a")


def test_fingerprinted_adapter_still_loads_in_peft(llama, tmp_path):
    import peft
    import transformers

    base_dir, _ = llama
    ref = _trained_adapter(base_dir, tmp_path / "a")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=IDS).logits, ref, rtol=1e-4, atol=1e-4)


def test_merge_refuses_a_mismatched_base(llama, tmp_path):
    from lmstack.tune.merge import merge_adapter

    base_dir, _ = llama
    _trained_adapter(base_dir, tmp_path / "a")
    other = tmp_path / "other"
    make_hf_model("llama", other, seed=7)
    with pytest.raises(CheckpointError, match="different base model"):
        merge_adapter(other, tmp_path / "a", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.warns(UserWarning):
        merge_adapter(other, tmp_path / "a", tmp_path / "merged", allow_base_mismatch=True)
    assert (tmp_path / "merged" / "config.json").is_file()
