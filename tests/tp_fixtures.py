"""Workers for tests/test_train_tp.py, launched by torchrun (gloo on CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_fixtures.py tp OUT SHARDS
    python -m torch.distributed.run --nproc_per_node 4 tests/tp_fixtures.py 2d OUT SHARDS

``tp``: logits of the tensor-parallel model (gathered) on a padded batch, then ``pretrain`` with
``train.tp_size=2``. ``2d``: ``pretrain`` on a (dp=2, tp=2) mesh (FSDP2 x TP). The test runs the same in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.train_fixtures import DIST_BATCH, DIST_SEQ, TINY_MODEL

TP_MODEL = dict(TINY_MODEL, qk_norm=True)  # Qwen3-style per-head norms: their gradients need the tp all-reduce


def tp_model(**over):
    from lmstack.model import build_model, preset

    return build_model(preset("tiny", **{**TP_MODEL, **over}), device="cpu", dtype="fp32", seed=0)


MOE_MODEL = dict(TINY_MODEL, intermediate_size=32, num_experts=4)  # Mixtral layout: experts stay replicated


def moe_model():
    from lmstack.model import build_model, preset

    return build_model(preset("moe", **MOE_MODEL), device="cpu", dtype="fp32", seed=0).train()


def moe_step(model, ids):
    """LM loss + router losses and their backward (under loss_parallel when the model is tensor parallel);
    returns the loss and the full gradients by name."""
    from lmstack.train import causal_lm_loss
    from lmstack.train.tensor_parallel import loss_context

    with loss_context(model):
        out = causal_lm_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
        out.loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()}
    return out.loss.detach(), grads


def padded_batch():
    import torch

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def pretrain_config(run_dir: Path, shards: Path, *, tp: int = 1, batch: int = DIST_BATCH, qk_norm: bool = True,
                    **train):
    from lmstack.train.config import PretrainConfig

    model = dict(TP_MODEL if qk_norm else TINY_MODEL)
    model.pop("vocab_size")
    t = dict(steps=4, warmup_steps=1, lr=1e-2, log_every=1, eval_every=2, eval_batches=2, ckpt_every=2,
             save_final=True, peak_flops=1e11, tensorboard=False, plot=False, seed=0, device="cpu",
             fused="foreach", tp_size=tp)
    t.update(train)
    return PretrainConfig(run_dir=str(run_dir), model={"preset": "tiny", "overrides": model},
                          data={"shards": str(shards), "seq_len": DIST_SEQ, "batch_size": batch, "val_windows": 0},
                          train=t)


def _main(mode: str, out: str, shards: str) -> None:  # pragma: no cover - runs under torchrun
    import torch
    import torch.distributed as dist

    from lmstack.train import pretrain

    torch.set_num_threads(1)
    out_p, sh = Path(out), Path(shards)
    dist.init_process_group("gloo")
    if mode == "tp":
        from torch.distributed.device_mesh import init_device_mesh

        from lmstack.train.tensor_parallel import parallelize

        model = parallelize(tp_model(), init_device_mesh("cpu", (2,)), gather_logits=True)
        ids, mask = padded_batch()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask)
        moe = parallelize(moe_model(), init_device_mesh("cpu", (2,)))
        loss, grads = moe_step(moe, ids)
        if dist.get_rank() == 0:
            torch.save(logits, out_p / "logits_tp.pt")
            torch.save({"loss": loss, "grads": grads}, out_p / "moe_tp.pt")
        pretrain(pretrain_config(out_p / "tp", sh, tp=2))
    else:
        pretrain(pretrain_config(out_p / "2d", sh, tp=2, qk_norm=False, distributed="fsdp"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _main(*sys.argv[1:4])
