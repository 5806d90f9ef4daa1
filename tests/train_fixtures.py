"""Helpers for the training tests: tiny token shards written by hand in the lmstack-shards-v1 format
(independent of lmstack.data, so the reader is tested against the format, not against its own writer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

TINY_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_tokenizer_json(word: str = "hello") -> bytes:
    """A valid (WordLevel) tokenizer.json: saving a model reads its tokenizer's stop tokens."""
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0, word: 1}, unk_token="<unk>")).to_str().encode()


TINY_TOKENIZER = tiny_tokenizer_json()


def write_shards(root: Path, *, train_tokens: int = 4000, val_tokens: int = 600, vocab: int = 256,
                 n_files: int = 2, seed: int = 0, tokenizer_json: bytes | None = TINY_TOKENIZER,
                 eos: int = 2) -> Path:
    """Documents of a learnable pattern (counting mod 50 from a random start) separated by EOS."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def stream(n: int) -> np.ndarray:
        out: list[int] = []
        while len(out) < n:
            start, length = int(rng.integers(3, 50)), int(rng.integers(10, 60))
            out.extend(3 + (start + np.arange(length)) % 50)
            out.append(eos)
        return np.asarray(out[:n], dtype=np.uint16)

    splits = {}
    for split, total, nf in (("train", train_tokens, n_files), ("val", val_tokens, 1)):
        files = []
        per = total // nf if nf else 0
        for i in range(nf):
            arr = stream(per)
            name = f"{split}_{i:05d}.bin"
            arr.tofile(root / name)
            files.append({"path": name, "tokens": int(len(arr)), "documents": int((arr == eos).sum())})
        splits[split] = {"files": files, "tokens": sum(f["tokens"] for f in files),
                         "documents": sum(f["documents"] for f in files)}
    sha = None
    tok_dir = None
    if tokenizer_json is not None:
        tok_dir = root / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        (tok_dir / "tokenizer.json").write_bytes(tokenizer_json)
        sha = hashlib.sha256(tokenizer_json).hexdigest()
    index = {"format": "lmstack-shards-v1", "dtype": "uint16", "vocab_size": vocab, "eos_token_id": eos,
             "tokenizer_sha256": sha, "tokenizer_dir": str(tok_dir) if tok_dir else None,
             "splits": splits, "sources": []}
    (root / "index.json").write_text(json.dumps(index))
    return root


# ------------------------------------------------------------------------------------------------------
# A 2-process worker for tests/test_train_dist.py, launched as
#   python -m torch.distributed.run --nproc_per_node 2 tests/train_fixtures.py OUT SHARDS
# It runs, in one process group: DDP (4 steps), FSDP2 (4 steps, checkpoint every 2, final model), and
# FSDP2 again crashing after its step-2 checkpoint, then resumed with resume=auto.
DIST_STEPS, DIST_BATCH, DIST_SEQ = 4, 2, 32


def dist_train_config(**kw):
    from lmstack.train import TrainConfig

    base = dict(steps=DIST_STEPS, warmup_steps=1, lr=1e-2, schedule="cosine", log_every=1, eval_every=0,
                ckpt_every=0, save_final=False, peak_flops=1e11, tensorboard=False, plot=False, seed=0,
                device="cpu", fused="foreach")
    base.update(kw)
    return TrainConfig(**base)


def dist_model():
    from lmstack.model import build_model, preset

    return build_model(preset("tiny", **TINY_MODEL), device="cpu", dtype="fp32", seed=0)


def dist_data(shards: Path, rank: int, world: int, batch: int):
    from lmstack.data.shards import open_split
    from lmstack.train.data import PackedBatches

    return PackedBatches(open_split(shards, "train"), DIST_SEQ, batch, seed=0, rank=rank, world_size=world)


def _dist_main(out: str, shards: str) -> None:  # pragma: no cover - runs under torchrun
    import torch

    from lmstack.train import causal_lm_loss, fit

    torch.set_num_threads(1)
    out_p, sh = Path(out), Path(shards)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    fit(dist_model(), dist_data(sh, rank, world, DIST_BATCH), causal_lm_loss,
        dist_train_config(distributed="ddp"), out_p / "ddp")
    fit(dist_model(), dist_data(sh, rank, world, DIST_BATCH), causal_lm_loss,
        dist_train_config(distributed="fsdp", ckpt_every=2, save_final=True), out_p / "fsdp")

    class Crash(Exception):
        pass

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3's forward, after the step-2 checkpoint
            raise Crash
        return causal_lm_loss(model, batch)

    try:
        fit(dist_model(), dist_data(sh, rank, world, DIST_BATCH), crashing_loss,
            dist_train_config(distributed="fsdp", ckpt_every=2, save_final=True), out_p / "fsdp_resume")
    except Crash:
        pass
    fit(dist_model(), dist_data(sh, rank, world, DIST_BATCH), causal_lm_loss,
        dist_train_config(distributed="fsdp", ckpt_every=2, save_final=True, resume="auto"),
        out_p / "fsdp_resume")
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------
# A run that SIGKILLs itself during step KILL_AT's forward (after the step-3 checkpoint), launched as
#   python tests/train_fixtures.py kill RUN_DIR SHARDS
KILL_STEPS, KILL_AT = 6, 5


def kill_train_config(**kw):
    return dist_train_config(steps=KILL_STEPS, ckpt_every=3, keep_last=2, save_final=True, **kw)


def _kill_main(run_dir: str, shards: str) -> None:  # pragma: no cover - killed by design
    import os
    import signal

    import torch

    from lmstack.train import causal_lm_loss, fit

    torch.set_num_threads(2)
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return causal_lm_loss(model, batch)

    fit(dist_model(), dist_data(Path(shards), 0, 1, 4), loss, kill_train_config(), run_dir)


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1] == "kill":
        _kill_main(sys.argv[2], sys.argv[3])
    else:
        _dist_main(sys.argv[1], sys.argv[2])


def interrupt_loss_at(monkeypatch, module, name: str, sig, call: int = 2):
    """Replace the loss function ``module.name`` with one that raises ``sig`` at its ``call``-th call -- as
    ``kill -TERM`` / Ctrl-C arriving during that training step -- and otherwise computes the real loss, which
    it returns (to put back before resuming)."""
    import signal

    real, calls = getattr(module, name), {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(sig)
        return real(model, batch)

    monkeypatch.setattr(module, name, loss)
    return real
