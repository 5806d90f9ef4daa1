"""Tensor parallelism (lmstack/train/tensor_parallel.py) with 2 gloo processes on CPU under torchrun, against the
same model and run in one process: the gathered logits on a padded batch, an MoE model's loss and gradients, then
`pretrain` with ``train.tp_size=2`` (losses at every step, validation losses, the final weights gathered from the
shards). FSDP2 x TP on a 2-D (2 x 2) mesh with 4 processes is tests/dist_2d_mesh.py (`make test-dist2d`).

Tolerance 1e-5 absolute on logits and losses (1e-4 on the final weights, see below): the row-parallel layers sum
partial products across ranks, a different order of additions than one process; bit-equality is not expected.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_dist import free_port
from tests.test_train_mlm_cli import run_cli
from tests.tp_fixtures import moe_model, moe_step, padded_batch, pretrain_config, tp_model
from tests.train_fixtures import write_shards

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, mode: str, out: Path, shards: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMSTACK_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(ROOT / "tests" / "tp_fixtures.py"), mode, str(out), str(shards)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("torchrun timed out:\n" + log[-3000:])
    assert proc.returncode == 0, log[-5000:]


def records(run: Path, key: str) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r]


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    from lmstack.train import pretrain

    tmp = tmp_path_factory.mktemp("tp")
    shards = write_shards(tmp / "shards")
    torchrun(2, "tp", tmp, shards)
    torch.set_num_threads(1)
    pretrain(pretrain_config(tmp / "single", shards))  # the same global batch: TP ranks share theirs
    return tmp


def test_tp_logits_equal_one_process(tp_runs):
    ids, mask = padded_batch()
    with torch.no_grad():
        want = tp_model()(ids, attention_mask=mask)
    got = torch.load(tp_runs / "logits_tp.pt")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_tp_moe_loss_and_gradients_equal_one_process(tp_runs):
    """A Mixtral-layout MoE under TP (attention sharded, router and experts replicated): the LM + router loss and
    every parameter's gradient equal one process."""
    ids, _ = padded_batch()
    loss, grads = moe_step(moe_model(), ids)
    got = torch.load(tp_runs / "moe_tp.pt")
    torch.testing.assert_close(got["loss"], loss, atol=1e-5, rtol=0)
    assert got["grads"].keys() == grads.keys() and any(".experts." in k for k in grads)
    for k, g in grads.items():
        torch.testing.assert_close(got["grads"][k], g, atol=1e-6, rtol=1e-4, msg=k)


def test_tp_pretrain_matches_one_process(tp_runs):
    single, tp = tp_runs / "single", tp_runs / "tp"
    loss1, loss_tp = records(single, "loss"), records(tp, "loss")
    assert len(loss1) == len(loss_tp) == 4 and loss1[-1] < loss1[0]  # it trains
    torch.testing.assert_close(loss_tp, loss1, atol=1e-5, rtol=0)  # step 1: logits; later: the updates
    torch.testing.assert_close(records(tp, "val_loss"), records(single, "val_loss"), atol=1e-5, rtol=0)
    torch.testing.assert_close(records(tp, "grad_norm"), records(single, "grad_norm"), atol=1e-4, rtol=1e-5)
    # the final weights, gathered from the shards on save. 1e-4: AdamW divides by sqrt(v), so an element whose
    # gradient is ~1e-8 (a dead SiLU unit) moves by ~lr whichever way rounding tips it (observed: 4e-5, 5 of 90k)
    w1, wt = weights(single / "final"), weights(tp / "final")
    assert w1.keys() == wt.keys()
    for k in w1:
        torch.testing.assert_close(wt[k], w1[k], atol=1e-4, rtol=0, msg=k)
    assert (tp / "checkpoints" / "step_000004" / "dcp" / ".metadata").is_file()  # sharded checkpoint
    state = torch.load(tp / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=True)
    assert state["distributed"] == "tp" and state["tp_size"] == 2


def test_tp_refusals(tmp_path):
    from lmstack.errors import ConfigError
    from lmstack.model import preset
    from lmstack.train.tensor_parallel import check_tp

    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        check_tp(preset("tiny", num_attention_heads=6, num_key_value_heads=3, hidden_size=96), 2)
    shards = write_shards(tmp_path / "shards")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'r'}\ndata: {{shards: {shards}, seq_len: 32, batch_size: 2}}\n"
                   "train: {steps: 2, warmup_steps: 0, device: cpu}\n")
    rc, out = run_cli("pretrain", "--config", str(cfg), "--tp", "2")
    assert rc == 2 and out.startswith("lmstack: "), out
    assert "train.tp_size=2 must divide the number of processes (1)" in out and "Traceback" not in out
