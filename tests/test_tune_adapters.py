"""LoRA / prompt tuning / prefix tuning against PEFT on the same tiny random transformers model."""

from __future__ import annotations

import pytest
import torch

from lmstack.model import load_model, save_model
from lmstack.model.attention import build_mask
from lmstack.tune.adapters import load_adapter, save_lora_adapter, save_prompt_adapter
from lmstack.tune.lora import LoRALinear, LoraSpec, apply_lora, count_parameters, lora_disabled, merge_lora
from lmstack.tune.prompt import PrefixContext, PromptEncoder, PromptSpec, PromptTunedModel
from tests.conftest import make_hf_model

torch.set_num_threads(2)
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 200, 11], [8, 1, 64, 33, 250, 9, 12, 4]])


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_hf_model("qwen2", path)
    return path


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_at_init_is_exactly_base(qwen2_dir):
    model = load_model(qwen2_dir)
    with torch.no_grad():
        base = model(IDS)
        apply_lora(model, LoraSpec(r=4, alpha=8, target_modules="all-linear"))
        tuned = model(IDS)
    assert torch.equal(base, tuned)
    trainable, total = count_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # 2 layers x 7 linears; each adds r * (in + out)
    c = model.config
    qo = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    per_layer = 4 * ((64 + qo) + 2 * (64 + kv) + (qo + 64) + 2 * (64 + 128) + (128 + 64))
    assert trainable == 2 * per_layer
    assert total == trainable + load_model(qwen2_dir).num_parameters()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lora_matches_peft_and_saved_adapter_loads_in_peft(arch, tmp_path):
    import peft

    hf = make_hf_model(arch, tmp_path / "base")
    model = load_model(tmp_path / "base")
    spec = LoraSpec(r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora(model, spec)
    _randomize_lora(model)
    save_lora_adapter(model, tmp_path / "adapter", spec)

    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(IDS)
        ref = peft_model(input_ids=IDS).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # and the base was really changed by the adapter
    with torch.no_grad(), lora_disabled(model):
        assert (model(IDS) - ours).abs().max() > 1e-3

    # merge: a plain model directory with the same logits, loadable by transformers
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    save_model(model, tmp_path / "merged")
    import transformers

    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged_hf(input_ids=IDS).logits, ref, rtol=1e-4, atol=1e-4)


def test_lora_on_top_layers_only_matches_peft_and_stops_backprop_below(tmp_path):
    import peft

    from lmstack.errors import ConfigError

    hf = make_hf_model("llama", tmp_path / "base")
    model = load_model(tmp_path / "base")
    spec = LoraSpec(r=4, alpha=8, target_modules="all-linear", layers_to_transform=[-1])  # the top layer of 2
    wrapped = apply_lora(model, spec)
    assert wrapped and all(".layers.1." in n for n in wrapped)
    _randomize_lora(model)
    save_lora_adapter(model, tmp_path / "adapter", spec)
    import json

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers"
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(input_ids=IDS).logits
        torch.testing.assert_close(model(IDS), ref, rtol=1e-4, atol=1e-4)
    # backward never reaches the layer below the adapted one: its activations need no gradient
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad if torch.is_tensor(o)
                                                                              else o[0].requires_grad))
    model(IDS).sum().backward()
    assert seen == [False]
    reloaded = load_model(tmp_path / "base")
    load_adapter(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="layer 5 does not exist; the model has 2 layers"):
        apply_lora(load_model(tmp_path / "base"), LoraSpec(layers_to_transform=[5]))


def test_load_adapter_round_trip_lora(qwen2_dir, tmp_path):
    model = load_model(qwen2_dir)
    spec = LoraSpec(r=2, alpha=4, target_modules="all-linear", use_rslora=True)
    apply_lora(model, spec)
    _randomize_lora(model, seed=3)
    save_lora_adapter(model, tmp_path / "a", spec)
    fresh = load_model(qwen2_dir)
    rt = load_adapter(fresh, tmp_path / "a")
    assert rt.method == "lora" and rt.prefix_kv is None and len(rt.wrapped_modules) == 14
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "qwen3"])  # mistral: sliding window 8 < P + T = 13
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_match_peft(method, arch, tmp_path):
    import peft

    hf = make_hf_model(arch, tmp_path / "base")
    base = load_model(tmp_path / "base")
    enc = PromptEncoder(base, method, PromptSpec(num_virtual_tokens=5), seed=2)
    with torch.no_grad():
        enc.prompt_embeddings.add_(torch.randn(enc.prompt_embeddings.shape) * 0.05)
    tuned = PromptTunedModel(base, enc)
    save_prompt_adapter(enc, base, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    mask = torch.ones_like(IDS)
    mask[1, 6:] = 0  # right padding in row 1
    with torch.no_grad():
        ours = tuned(IDS, attention_mask=mask)
        ref = peft_model(input_ids=IDS, attention_mask=mask).logits
        plain = base(IDS, attention_mask=mask)
    if method == "prompt":
        ref = ref[:, 5:]  # PEFT returns logits for the virtual tokens too
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1, :6], ref[1, :6], rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-3

    # the serving contract: prefix_kv from load_adapter + PrefixContext gives the same logits
    rt = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    assert rt.method == method and len(rt.prefix_kv) == 2
    assert rt.prefix_kv[0][0].shape == (2, 5, base.config.head_dim)
    ctx = PrefixContext(rt.prefix_kv, mask, base.config.sliding_window)
    pos = 5 + (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        served = base(IDS, position_ids=pos, ctx=ctx)
    torch.testing.assert_close(served[0], ours[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(served[1, :6], ours[1, :6], rtol=1e-4, atol=1e-4)


def test_prefix_changes_outputs_only_through_prefixes(qwen2_dir):
    base = load_model(qwen2_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    enc = PromptEncoder(base, "prefix", PromptSpec(num_virtual_tokens=3))
    tuned = PromptTunedModel(base, enc)
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=1.0)
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["encoder.prompt_embeddings"]
    loss = tuned(IDS).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    # the base is reached only through attention: masking the P prefix slots out gives the plain model
    # (RoPE is relative, so the shifted positions P, P+1, ... change nothing once the prefix is invisible)
    kv = enc.prefix_kv(base)
    P = 3
    ctx = PrefixContext(kv, None)
    T = IDS.shape[1]
    hidden_pos = P + torch.arange(T).expand(2, T)
    ctx_masked = PrefixContext(kv, torch.ones(2, T, dtype=torch.long))
    ctx_masked._masks[(2, T, torch.device("cpu"), None)] = build_mask(  # (batch, T, device, window) -> mask
        torch.arange(P, P + T), torch.arange(P + T),
        torch.cat([torch.zeros(2, P, dtype=torch.bool), torch.ones(2, T, dtype=torch.bool)], 1), None)  # prefix hidden
    with torch.no_grad():
        plain = base(IDS)
        masked = base(IDS, position_ids=hidden_pos, ctx=ctx_masked)
        with_prefix = base(IDS, position_ids=hidden_pos, ctx=ctx)
    torch.testing.assert_close(masked, plain, rtol=1e-4, atol=1e-4)
    assert (with_prefix - plain).abs().max() > 1e-3


def test_adapter_trained_with_peft_loads_in_lmstack(tmp_path):
    import peft

    hf = make_hf_model("llama", tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "peft_adapter")
    model = load_model(tmp_path / "base")
    rt = load_adapter(model, tmp_path / "peft_adapter")
    assert sorted({n.rsplit(".", 1)[-1] for n in rt.wrapped_modules}) == ["k_proj", "up_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), pm(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


def test_adapter_errors_name_the_problem(qwen2_dir, tmp_path):
    from lmstack.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(load_model(qwen2_dir), tmp_path)
    model = load_model(qwen2_dir)
    spec = LoraSpec(r=2, alpha=4, target_modules=["q_proj"])
    apply_lora(model, spec)
    save_lora_adapter(model, tmp_path / "a", spec)
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 3, "target_modules": ["q_proj"]}')
    with pytest.raises(CheckpointError, match=r"has shape \(2, 64\) but this model needs \(3, 64\)"):
        load_adapter(load_model(qwen2_dir), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(CheckpointError, match="peft_type 'IA3' is not supported"):
        load_adapter(load_model(qwen2_dir), tmp_path / "a")


def test_lora_init_from_continues_a_saved_adapter(qwen2_dir, tmp_path):
    """lora.init_from: the prepared model starts from the saved A/B (logits equal the adapter loaded for inference
    by the other path, load_adapter), trains only LoRA, and a section that adapts other modules is refused."""
    from lmstack.errors import CheckpointError
    from lmstack.tune.adapters import init_lora_from
    from lmstack.tune.lora import lora_state_dict
    from lmstack.tune.methods import prepare

    spec = LoraSpec(r=4, alpha=8, target_modules="all-linear", layers_to_transform=[-1])
    first = prepare(qwen2_dir, "lora", lora=spec, seed=0)
    _randomize_lora(first.model)
    save_lora_adapter(first.model, tmp_path / "ad", spec, str(qwen2_dir))

    cont = prepare(qwen2_dir, "lora", lora=spec, seed=5, init_adapter=tmp_path / "ad")
    a, b = lora_state_dict(first.model), lora_state_dict(cont.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n for n, p in cont.model.named_parameters() if p.requires_grad} == {n for n in dict(
        cont.model.named_parameters()) if "lora_" in n}
    ref = load_model(qwen2_dir).eval()
    load_adapter(ref, tmp_path / "ad")
    with torch.no_grad():
        assert torch.allclose(cont.model.eval()(IDS), ref(IDS), atol=1e-5)
        assert not torch.allclose(cont.model(IDS), load_model(qwen2_dir)(IDS), atol=1e-3)

    fresh = prepare(qwen2_dir, "lora", lora=LoraSpec(r=8, alpha=16, target_modules="all-linear",
                                                     layers_to_transform=[-1]), seed=0)
    with pytest.raises(CheckpointError, match="r=4 but the lora section says 8"):
        init_lora_from(fresh.model, tmp_path / "ad", LoraSpec(r=8, alpha=16))
    wider = LoraSpec(r=4, alpha=8, target_modules="all-linear")
    with pytest.raises(CheckpointError, match="adapts other modules"):
        prepare(qwen2_dir, "lora", lora=wider, init_adapter=tmp_path / "ad")
