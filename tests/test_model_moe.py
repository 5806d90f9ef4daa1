"""Mixture of experts against transformers: Mixtral, Qwen2-MoE (shared expert, sigmoid gate) and Qwen3-MoE
logits (load and save), the sorted dispatch against a per-token loop written here, the load-balancing loss
against transformers' ``load_balancing_loss_func``, the z-loss against its formula, gradients reaching the
router, the ``moe`` preset, and the serving engine's greedy output against transformers ``generate``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmstack.model import KVCache, Transformer, load_model, preset, save_model
from lmstack.model.moe import dispatch, load_balancing_loss, route, z_loss
from tests.model_fixtures import MOE_ARCHS, make_model
from tests.test_model_hf import hf_logits, padded_batch


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"moe_{request.param}")
    return request.param, path, make_model(request.param, path)


def test_moe_logits_match_transformers(moe_dir):
    arch, path, hf = moe_dir
    ours = load_model(path, device="cpu", dtype="fp32")
    assert ours.config.model_type == arch and ours.config.num_experts == 4
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=pos)
    assert_close(got[mask.bool()], hf_logits(hf, ids, mask, pos)[mask.bool()], atol=1e-4, rtol=1e-4)


def test_moe_save_loads_in_transformers_with_hub_names(moe_dir, tmp_path):
    import transformers
    from safetensors import safe_open

    arch, path, hf = moe_dir
    out = save_model(load_model(path), tmp_path / "saved")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expert = {"mixtral": "model.layers.0.block_sparse_moe.experts.3.w2.weight"}.get(
        arch, "model.layers.0.mlp.experts.3.down_proj.weight")
    assert expert in keys  # the per-expert layout of Hub checkpoints
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, pos = padded_batch()
    assert_close(hf_logits(back, ids, mask, pos)[mask.bool()], hf_logits(hf, ids, mask, pos)[mask.bool()],
                 atol=1e-5, rtol=1e-5)


def test_moe_kv_cache_matches_full_forward(moe_dir):
    _, path, _ = moe_dir
    m = load_model(path)
    cfg = m.config
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        full = m(ids, attention_mask=mask, position_ids=pos)
        cache = KVCache(cfg.num_hidden_layers, 3, cfg.num_key_value_heads, cfg.head_dim, 32, torch.float32,
                        torch.device("cpu"), cfg.sliding_window)
        cache.set_padding(mask[:, :15])
        outs = [m(ids[:, :15], position_ids=pos[:, :15], ctx=cache)]
        cache.advance(15)
        for t in range(15, 20):
            cache.set_padding(mask[:, t:t + 1])
            outs.append(m(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], ctx=cache))
            cache.advance(1)
    assert_close(torch.cat(outs, 1)[mask.bool()], full[mask.bool()], atol=1e-4, rtol=1e-4)


def test_sorted_dispatch_equals_per_token_sum():
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8))
                                  for _ in range(5))
    x = torch.randn(37, 8)
    logits = torch.randn(37, 5)
    logits[:, 4] = -30  # expert 4 receives no token: an empty group
    w, idx = route(logits, 2, normalize=False)
    want = torch.zeros_like(x)
    probs = logits.softmax(-1)
    for t in range(37):  # reference: each token, its two most probable experts, weighted by their probability
        top = sorted(range(5), key=lambda e: -probs[t, e].item())[:2]
        for e in top:
            want[t] += probs[t, e] * experts[e](x[t])
    with torch.no_grad():
        assert_close(dispatch(x, w, idx, experts), want.detach(), atol=1e-5, rtol=1e-5)
    wn, _ = route(logits, 2, normalize=True)
    assert_close(wn.sum(-1), torch.ones(37))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(2 * 9, 6, generator=g) for _ in range(3)]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    am = mask if masked else None
    want = load_balancing_loss_func(tuple(layers), 6, 2, am)
    assert_close(load_balancing_loss(layers, 6, 2, am), want)
    # perfectly uniform routing gives the minimum, top_k (f sums to k over experts, P = 1/E)
    assert_close(load_balancing_loss([torch.zeros(12, 6)], 6, 2), torch.tensor(2.0), atol=1e-6, rtol=0)


def test_z_loss_formula():
    logits = [torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.5, 0.5]]), torch.tensor([[3.0, -2.0, 0.0]])]
    rows = [[1.0, 2.0, -1.0], [0.5, 0.5, 0.5], [3.0, -2.0, 0.0]]
    want = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / 3
    assert z_loss(logits).item() == pytest.approx(want, rel=1e-6)


def test_router_losses_in_training_match_transformers_aux_loss(tmp_path):
    """In training mode the blocks keep their router logits; lmstack's load-balancing term equals the
    aux_loss transformers returns for the same batch, and the aux loss sends gradient to every router."""
    hf = make_model("mixtral", tmp_path, output_router_logits=True)
    ours = load_model(tmp_path).train()
    ids, mask, pos = padded_batch()
    hf.train()
    want = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).aux_loss
    ours(ids, attention_mask=mask, position_ids=pos)
    losses = ours.router_losses(mask)
    assert_close(losses["load_balancing"], want.detach(), atol=1e-5, rtol=1e-5)
    assert_close(losses["aux"], ours.config.router_aux_loss_coef * losses["load_balancing"]
                 + ours.config.router_z_loss_coef * losses["z"])
    losses["aux"].backward()
    for layer in ours.model.layers:
        assert layer.block_sparse_moe.gate.weight.grad.abs().sum() > 0
    ours.eval()
    with torch.no_grad():
        ours(ids)
    assert ours.router_losses() == {}  # nothing kept at inference


def test_moe_preset_parameters_and_active_share():
    cfg = preset("moe")
    with torch.device("meta"):  # shapes only
        m = Transformer(cfg)
    assert m.num_parameters() == cfg.num_parameters()
    active = cfg.num_parameters(active_only=True)
    assert active < 0.6 * cfg.num_parameters()
    per_layer_experts = cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert cfg.num_parameters() - active == cfg.num_hidden_layers * per_layer_experts * (
        cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_engine_greedy_matches_transformers(arch, tmp_path):
    from lmstack.serve.llm import load
    from tests.engine_fixtures import INIT, hf_greedy

    hf = make_model(arch, tmp_path, initializer_range=INIT)
    prompt = [40, 41] * 9 + [7]
    ref = hf_greedy(hf, prompt, 12)
    llm = load(tmp_path, device="cpu")
    assert "experts" in llm.engine.kernel_reason  # the compiled CPU kernel declines, with the reason
    outs = llm.generate([prompt, prompt[:5]], temperature=0, max_tokens=12, ignore_eos=True)
    assert outs[0].outputs[0].token_ids == ref
    assert llm.engine.block_manager.num_used == 0


def test_training_loss_adds_router_losses_and_learns(tmp_path):
    """lmstack's causal-LM loss adds the weighted router losses for an MoE model; a few AdamW steps on one
    batch lower the LM loss and report the load-balancing term."""
    import torch.nn.functional as F

    from lmstack.train.losses import causal_lm_loss

    make_model("qwen2_moe", tmp_path)
    m = load_model(tmp_path).train()
    m.config.router_z_loss_coef = 0.0
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1)}
    out = causal_lm_loss(m, batch)
    ce = F.cross_entropy(m(ids).flatten(0, 1), batch["targets"].flatten())
    lb = load_balancing_loss([b.router_logits for b in m.modules() if hasattr(b, "router_logits")], 4, 2)
    assert_close(out.loss, ce + m.config.router_aux_loss_coef * lb, atol=1e-5, rtol=1e-5)
    assert out.metrics["moe_load_balancing"] == pytest.approx(lb.item(), rel=1e-5)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = out.metrics["lm_loss"]
    for _ in range(8):
        opt.zero_grad()
        out = causal_lm_loss(m, batch)
        out.loss.backward()
        opt.step()
    assert out.metrics["lm_loss"] < first - 0.5


def test_info_counts_moe_parameters_like_transformers(moe_dir):
    from lmstack.model.info import model_info

    _, path, hf = moe_dir
    info = model_info(path)
    assert info["num_parameters"] == sum(p.numel() for p in hf.parameters())  # tied weights counted once
    assert "active parameters per token" in info["fields"]


def test_lora_on_attention_and_experts(tmp_path):
    """lmstack's LoRA module swap reaches expert projections by name: with random B the adapted MoE equals the
    base whose weights were updated by W + B A * alpha / r in this test, and only A, B receive gradients."""
    import copy

    from lmstack.tune.lora import LoraSpec, apply_lora

    make_model("mixtral", tmp_path)
    base = load_model(tmp_path)
    ref = copy.deepcopy(base)
    names = apply_lora(base, LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "w1", "w2", "w3"]))
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in names and len(names) == 2 * (2 + 3 * 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:
            lora = base.get_submodule(n)
            lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g) * 0.05)
            ref.get_submodule(n).weight += lora.lora_B.weight @ lora.lora_A.weight * (8.0 / 4)
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        assert_close(base(ids, attention_mask=mask, position_ids=pos), ref(ids, attention_mask=mask, position_ids=pos),
                     atol=1e-4, rtol=1e-4)
    base.train()
    base(ids[:, :8]).sum().backward()
    trained = {n for n, p in base.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)


def test_load_balancing_loss_balances_the_router():
    """Trained on the same data, a top-1 router collapses onto one expert without the auxiliary loss and
    spreads the tokens with it (the behaviour the loss exists for; its value approaches the minimum, 1.0)."""
    shares, lb = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 20k-parameter model: one thread is fastest, and robust to a busy machine
    try:
        _train_routers(shares, lb)
    finally:
        torch.set_num_threads(threads)
    assert shares[0.0].max() > 0.8  # collapsed
    assert shares[0.5].max() < 0.4 and shares[0.5].min() > 0.1  # spread over all four experts
    assert lb[0.5] < 1.1 < lb[0.0]


def _train_routers(shares: dict, lb: dict) -> None:
    import torch.nn.functional as F

    from lmstack.model import ModelConfig, build_model
    from lmstack.model.moe import expert_utilization

    for coef in (0.0, 0.5):
        cfg = ModelConfig(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                          num_experts_per_tok=1, router_aux_loss_coef=coef, initializer_range=0.2)
        m = build_model(cfg, device="cpu", dtype="fp32", seed=0).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(60):
            ids = torch.randint(64, (8, 32), generator=g)
            loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            losses = m.router_losses()
            (loss + losses["aux"]).backward()
            opt.step()
            opt.zero_grad()
        shares[coef], lb[coef] = expert_utilization(m)[0], losses["load_balancing"].item()


def test_pretrain_moe_preset_end_to_end(tmp_path):
    """`lmstack pretrain`'s library function trains the `moe` preset (shrunk) on token shards: the router losses
    are logged per step, and final/ is a Mixtral directory transformers loads to lmstack's logits."""
    import json

    import transformers

    from lmstack.train import pretrain
    from lmstack.train.config import PretrainConfig
    from tests.train_fixtures import write_shards

    shards = write_shards(tmp_path / "s")
    small = dict(vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_experts=4, max_position_embeddings=64)
    cfg = PretrainConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"preset": "moe", "overrides": small},
        "data": {"shards": str(shards), "seq_len": 16, "batch_size": 2},
        "train": {"steps": 3, "warmup_steps": 0, "log_every": 1, "device": "cpu", "tensorboard": False,
                  "plot": False}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = pretrain(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in open(res.metrics_path)]
    logged = [r for r in rows if "moe_load_balancing" in r]
    # E * sum_e f_e P_e with f_e <= 1 and sum_e P_e = 1: in (0, E]; top_k (2) when routing is uniform
    assert len(logged) == 3 and all(0 < r["moe_load_balancing"] <= 4 for r in logged)
    assert all(r["loss"] > r["lm_loss"] for r in logged)  # the logged loss includes the weighted aux loss
    hf = transformers.AutoModelForCausalLM.from_pretrained(res.final_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(3, 256, (1, 12))
    with torch.no_grad():
        assert_close(load_model(res.final_dir)(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
