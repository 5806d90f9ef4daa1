"""``lmstack distill``: train a student on a teacher's temperature-softened distributions plus the labels.

Loss per assistant token (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):
``alpha · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 - alpha) · CE(z_s, y)``. Teacher and student
must share a vocabulary (same size and, when both directories have one, the same tokenizer.json).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.errors import ConfigError
from lmstack.model import ModelConfig, load_model
from lmstack.train import FitResult, LossOutput, fit
from lmstack.tune.batches import SFTBatches, sft_eval_batches
from lmstack.tune.config import DistillConfig
from lmstack.tune.losses import forward_logits, kd_loss
from lmstack.tune.sft import console, load_splits, load_tokenizer, pad_id_of, prepare_for
from lmstack.utils.device import resolve_device
from lmstack.utils.io import file_sha256


def check_same_vocab(teacher: str, student: str) -> None:
    vt, vs = ModelConfig.from_hf(teacher).vocab_size, ModelConfig.from_hf(student).vocab_size
    if vt != vs:
        raise ConfigError(f"teacher {teacher} has vocab_size {vt} but student {student} has {vs}; "
                          "distillation needs a shared vocabulary")
    tt, ts = Path(teacher) / "tokenizer.json", Path(student) / "tokenizer.json"
    if tt.is_file() and ts.is_file() and file_sha256(tt) != file_sha256(ts):
        raise ConfigError(f"{tt} and {ts} differ; distillation needs teacher and student to share a tokenizer")


def distill(cfg: DistillConfig) -> FitResult:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_same_vocab(cfg.teacher, cfg.student)
    tok = load_tokenizer(cfg.student, cfg.tokenizer)
    pad = pad_id_of(tok)
    d = cfg.data
    train_ex, val_ex = load_splits(d, tok, cfg.student, cfg.train.seed, run_dir)

    prep = prepare_for(cfg, cfg.student)
    dev = resolve_device(cfg.train.device)
    teacher = load_model(cfg.teacher, device=dev, dtype=prep.base.dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    T, alpha = cfg.distill.temperature, cfg.distill.alpha

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        with torch.no_grad():
            t_logits = forward_logits(teacher, batch)
        loss, n, metrics = kd_loss(forward_logits(m, batch), t_logits, batch["labels"], T, alpha)
        return LossOutput(loss, n, metrics)

    batches = SFTBatches(train_ex, d.batch_size, pad, seed=cfg.train.seed, packing=d.packing, seq_len=d.max_len,
                         group_by_length=d.group_by_length)
    val = sft_eval_batches(val_ex, d.batch_size, pad) if val_ex else None
    console.print(f"[bold]distill[/bold] teacher {cfg.teacher} -> student {cfg.student} (T={T}, alpha={alpha})")
    return fit(prep.model, batches, loss_fn, cfg.train, run_dir, val_data=val, save_model_fn=prep.save_fn,
               tokenizer_dir=cfg.tokenizer or cfg.student, run_config=cfg)
