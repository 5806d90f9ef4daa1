"""Continued pretraining with replay (data.replay, data.replay_share): each batch holds the configured share of
general (replay) windows, the rest domain windows, whatever the number of processes; resume is exact; pretrain()
runs with it and refuses replay shards made with another tokenizer."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from lmstack.errors import ConfigError, DataError
from lmstack.train import PretrainConfig, pretrain
from lmstack.train.data import PackedBatches, ReplayBatches, replay_count
from tests.train_fixtures import TINY_MODEL, write_shards

T = 8


def streams(seed=0):
    dom = [np.arange(0, 400, dtype=np.int64) % 100]            # domain tokens < 100
    gen = [1000 + np.arange(0, 600, dtype=np.int64) % 100]     # general tokens >= 1000
    return (PackedBatches(dom, T, 1, seed=seed), PackedBatches(gen, T, 1, seed=seed + 1))


@pytest.mark.parametrize("share,batch", [(0.25, 4), (0.3, 4), (0.5, 6), (0.0, 4), (1.0, 3), (0.1, 8)])
def test_batches_hold_the_configured_share(share, batch):
    d, g = streams()
    src = ReplayBatches(d, g, share, batch)
    n_rep, n_all = 0, 0
    for step in range(40):
        b = next(src)
        rows = b["input_ids"]
        from_general = (rows >= 1000).all(dim=1)
        assert ((rows < 100).all(dim=1) | from_general).all()  # each row wholly from one stream
        assert torch.equal(from_general, b["is_replay"])
        n_rep += int(from_general.sum())
        n_all += batch
        # every prefix of the run is within one row of the share (independent count: Fraction arithmetic)
        assert abs(n_rep - Fraction(share).limit_denominator(1000) * n_all) < 1
    assert n_rep == int(np.floor(share * n_all + 1e-9))
    if share == 0.25 and batch == 4:
        assert all(replay_count(s, 4, 0.25) == 1 for s in range(10))


def test_two_processes_together_get_the_one_process_batch():
    one = ReplayBatches(*streams(), 0.25, 8)
    ranks = [ReplayBatches(*streams(), 0.25, 4, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        a = next(one)["input_ids"]
        b = torch.cat([next(r)["input_ids"] for r in ranks])
        assert torch.equal(a, b)


def test_resume_is_exact_and_share_is_checked():
    from lmstack.errors import CheckpointError

    a = ReplayBatches(*streams(), 0.25, 4)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    b = ReplayBatches(*streams(), 0.25, 4)
    b.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])
    with pytest.raises(CheckpointError, match="replay_share"):
        ReplayBatches(*streams(), 0.5, 4).load_state_dict(state)


def _cfg(tmp_path, **data):
    return PretrainConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "overrides": dict(TINY_MODEL)},
        "data": {"shards": str(tmp_path / "dom"), "seq_len": 32, "batch_size": 4, **data},
        "train": {"steps": 2, "warmup_steps": 1, "lr": 1e-2, "log_every": 1, "eval_every": 0, "ckpt_every": 0,
                  "peak_flops": 1e11, "tensorboard": False, "plot": False}})


def test_pretrain_with_replay_and_bad_replay(tmp_path):
    write_shards(tmp_path / "dom", train_tokens=3000, seed=0)
    write_shards(tmp_path / "gen", train_tokens=3000, seed=1)
    res = pretrain(_cfg(tmp_path, replay=str(tmp_path / "gen"), replay_share=0.25))
    assert res.stopped == "completed" and res.steps == 2
    from lmstack.config import validate

    with pytest.raises(ConfigError, match="replay_share"):
        validate(PretrainConfig, {"data": {"shards": "x", "replay_share": 0.5}})
    write_shards(tmp_path / "other", train_tokens=3000, tokenizer_json=b'{"other": 1}')
    with pytest.raises(DataError, match="another tokenizer"):
        pretrain(_cfg(tmp_path, replay=str(tmp_path / "other"), replay_share=0.5))
