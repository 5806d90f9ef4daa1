"""FSDP2 x tensor parallel on a 2-D (dp=2, tp=2) mesh: 4 gloo processes on CPU under torchrun run `pretrain`
with ``train.tp_size=2, train.distributed=fsdp``; losses and final weights equal one process with the 2 replicas'
global batch. Four processes are too many for the default suite on 2 cores: ``make test-dist2d`` runs it.
"""

from __future__ import annotations

import torch

from tests.test_train_tp import records, torchrun, weights
from tests.tp_fixtures import pretrain_config
from tests.train_fixtures import DIST_BATCH, write_shards


def test_fsdp2_x_tp_2d_mesh_matches_one_process(tmp_path):
    from lmstack.train import pretrain

    shards = write_shards(tmp_path / "shards")
    torchrun(4, "2d", tmp_path, shards)
    torch.set_num_threads(1)
    pretrain(pretrain_config(tmp_path / "single", shards, qk_norm=False, batch=2 * DIST_BATCH))
    torch.testing.assert_close(records(tmp_path / "2d", "loss"), records(tmp_path / "single", "loss"),
                               atol=1e-5, rtol=0)
    w1, w2 = weights(tmp_path / "single" / "final"), weights(tmp_path / "2d" / "final")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0, msg=k)


