"""The classic RL bug, checked: the log-probs the engine sampled with equal the ones a training forward pass
recomputes -- before and after the weights change (LoRA and full policies), since the engine holds the policy
itself -- and the reference (adapter off) equals the base model."""

from __future__ import annotations

import pytest
import torch

from lmstack.model import load_model
from lmstack.rl.rollout import collate, generate, make_engine, response_logps
from lmstack.tune.lora import LoraSpec, apply_lora, lora_disabled, lora_modules
from tests.engine_fixtures import hf_model

PROMPTS = [[1, 17, 33, 5], [1, 90, 4, 4, 4, 61, 7], [1] + list(range(100, 140))]  # 41 tokens: two full KV blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_roll") / "m"
    hf_model("qwen2", d)
    return d


def rollouts(engine, seed):
    return generate(engine, PROMPTS, [{}] * len(PROMPTS), n=3, max_new_tokens=10, temperature=1.0, seed=seed)


def assert_engine_matches_forward(model, engine, seed):
    rolls = rollouts(engine, seed)
    assert len(rolls) == 9 and all(len(r.logps) == len(r.response_ids) > 0 for r in rolls)
    b = collate(rolls, pad_id=0)
    with torch.no_grad():
        lp = response_logps(model, b)
    torch.testing.assert_close(lp, b.old_logps, atol=2e-4, rtol=0)
    return b


def perturb(params):
    """An AdamW step on a random loss: the in-place update an RL step makes."""
    opt = torch.optim.AdamW(params, lr=0.05)
    loss = sum((p * torch.randn_like(p)).sum() for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_lora_policy_engine_logps_equal_training_forward_before_and_after_an_update(model_dir):
    torch.manual_seed(0)
    model = load_model(model_dir, dtype=torch.float32)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules="all-linear"))
    for _, m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.2)  # B = 0 would make the adapter a no-op
    engine = make_engine(model, None, max_num_seqs=16, max_model_len=80, kv_cache_memory=1 << 22)
    before = assert_engine_matches_forward(model, engine, seed=1)
    perturb([p for p in model.parameters() if p.requires_grad])
    after = assert_engine_matches_forward(model, engine, seed=1)  # same prompts, same seed: new weights used
    assert not torch.allclose(before.old_logps, after.old_logps)


def test_full_policy_engine_sees_in_place_updates_of_fused_weights(model_dir):
    model = load_model(model_dir, dtype=torch.float32)
    engine = make_engine(model, None, max_num_seqs=16, max_model_len=80, kv_cache_memory=1 << 22)
    before = assert_engine_matches_forward(model, engine, seed=2)
    for p in model.parameters():
        p.requires_grad_(True)
    perturb(list(model.parameters()))
    after = assert_engine_matches_forward(model, engine, seed=2)
    assert not torch.allclose(before.old_logps, after.old_logps)


def test_reference_with_the_adapter_off_is_the_base_model(model_dir):
    base = load_model(model_dir, dtype=torch.float32)
    policy = load_model(model_dir, dtype=torch.float32)
    apply_lora(policy, LoraSpec(r=4, alpha=8, target_modules="all-linear"))
    for _, m in lora_modules(policy):
        torch.nn.init.normal_(m.lora_B.weight, std=0.2)
    engine = make_engine(base, None, max_num_seqs=16, max_model_len=80, kv_cache_memory=1 << 22)
    b = collate(rollouts(engine, 3), pad_id=0)
    with torch.no_grad():
        want = response_logps(base, b)
        with lora_disabled(policy):
            ref = response_logps(policy, b)
        on = response_logps(policy, b)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=0)
    assert (on - want).abs().max() > 1e-2  # with the adapter on it is another model
