"""Schedules against torch's own schedulers / the published formulas on fixed numbers; AdamW groups."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack.train import TrainConfig
from lmstack.train.optim import build_optimizer, lr_at, param_groups


def test_cosine_after_warmup_matches_torch_cosine_annealing():
    cfg = TrainConfig(steps=50, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, schedule="cosine")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50 - 1 - 10, eta_min=1e-4)
    for step in range(10, 50):
        assert lr_at(step, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        ref.step()
    assert lr_at(49, cfg) == pytest.approx(1e-4)


def test_linear_warmup_values():
    cfg = TrainConfig(steps=100, warmup_steps=4, lr=1.0)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, cfg) == pytest.approx(1.0)


def test_wsd_on_fixed_numbers():
    # 100 steps, warmup 10, decay over the last 20% (steps 80..99) with 1 - sqrt (Hägele et al. 2024)
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(10, cfg) == 1.0 and lr_at(79, cfg) == 1.0
    assert lr_at(80, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.0)
    t = (90 - 80) / 19
    assert lr_at(90, cfg) == pytest.approx(1 - math.sqrt(t))


def test_linear_and_constant():
    lin = TrainConfig(steps=11, warmup_steps=0, lr=1.0, min_lr_ratio=0.0, schedule="linear")
    assert [lr_at(s, lin) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = TrainConfig(steps=11, warmup_steps=0, lr=0.3, schedule="constant")
    assert {lr_at(s, const) for s in range(11)} == {0.3}


def test_param_groups_decay_matrices_only_and_dedupe_tied():
    from lmstack.model import build_model, preset

    m = build_model(preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, attention_bias=True), device="cpu")
    groups = param_groups(m, None, 0.1)
    decay, no_decay = groups[0]["params"], groups[1]["params"]
    assert all(p.ndim >= 2 for p in decay) and all(p.ndim < 2 for p in no_decay)
    assert sum(p.numel() for g in groups for p in g["params"]) == m.num_parameters()  # tied counted once
    names_no_decay = {n for n, p in m.named_parameters() if any(p is q for q in no_decay)}
    assert "model.layers.0.self_attn.q_proj.bias" in names_no_decay and "model.norm.weight" in names_no_decay


def test_optimizer_only_given_params_and_nothing_to_train_error():
    from lmstack.errors import ConfigError

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(m, TrainConfig(), params=[m[0].weight])
    assert [p for g in opt.param_groups for p in g["params"]] == [m[0].weight]
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        build_optimizer(m, TrainConfig())


def test_warmup_longer_than_run_is_rejected():
    from lmstack.config import validate
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="warmup_steps"):
        validate(TrainConfig, {"steps": 10, "warmup_steps": 10})
