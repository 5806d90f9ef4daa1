"""``lmstack align dpo``: Direct Preference Optimization (Rafailov et al. 2023) on preference pairs.

Reads top to bottom: tokenizer -> pairs (loss on each reply's assistant tokens) -> policy for the method
(full / LoRA / QLoRA) -> reference log-probs -> ``fit`` with the DPO loss -> run_dir/final.

The reference is the initial policy. ``dpo.reference=precompute`` (default) scores every pair once before
training (no second model in memory); ``live`` scores each batch with a frozen copy, or for LoRA/QLoRA with
the same model and its adapters switched off (no copy either). Logged per step: ``rewards_chosen``,
``rewards_rejected`` (β·log-ratio), ``reward_margin`` and ``pref_accuracy``; after training the same
metrics over the validation pairs are written to ``run_dir/dpo_eval.json``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from lmstack.train import FitResult, LossOutput, fit
from lmstack.tune.batches import PairBatches, collate_pairs, pair_eval_batches
from lmstack.tune.config import DPOConfig
from lmstack.tune.data import PairExample, load_pairs
from lmstack.tune.losses import dpo_loss, model_sequence_logps
from lmstack.tune.lora import lora_disabled, lora_modules
from lmstack.tune.sft import console, load_splits, load_tokenizer, pad_id_of, prepare_for
from lmstack.utils.io import atomic_write_json
from lmstack.utils.progress import progress


def pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed reply log-probs, each (B,), from one forward over the (2B, T) batch."""
    logps = model_sequence_logps(model, batch)
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]


def make_reference(model: nn.Module, mode: str) -> Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]:
    """A function batch -> reference (chosen, rejected) log-probs, under no_grad."""
    has_lora = any(True for _ in lora_modules(model))
    if has_lora:
        def ref(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            with torch.no_grad(), lora_disabled(model):
                return pair_logps(model, batch)
        return ref
    if mode == "precompute":  # the initial model itself; scored before any update
        def ref0(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                return pair_logps(model, batch)
        return ref0
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def ref_copy(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return pair_logps(frozen, batch)
    return ref_copy


def precompute_reference(pairs: list[PairExample], ref: Callable, batch_size: int, pad: int,
                         device: torch.device) -> None:
    """Fill ``ref_chosen`` / ``ref_rejected`` of every pair (one pass, with a progress bar)."""
    with progress() as bar:
        task = bar.add_task("reference log-probs", total=len(pairs))
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            b = {k: v.to(device) for k, v in collate_pairs(chunk, pad).items()}
            c, r = ref(b)
            for p, lc, lr in zip(chunk, c.tolist(), r.tolist()):
                p.ref_chosen, p.ref_rejected = lc, lr
            bar.update(task, advance=len(chunk))


def align_dpo(cfg: DPOConfig) -> FitResult:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    pad = pad_id_of(tok)
    d = cfg.data
    train_p, val_p = load_splits(d, tok, cfg.model, cfg.train.seed, run_dir, load=load_pairs)
    console.print(f"[bold]data[/bold] {len(train_p)} train / {len(val_p)} validation pairs")

    prep = prepare_for(cfg, cfg.model)
    model = prep.model
    device = next(model.parameters()).device
    ref = make_reference(model, cfg.dpo.reference)
    if cfg.dpo.reference == "precompute":
        model.eval()
        precompute_reference(train_p + val_p, ref, d.batch_size, pad, device)
        ref = None  # the batches now carry ref_logps

    beta, ls, lt = cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.loss_type

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        pc, pr = pair_logps(m, batch)
        if "ref_logps" in batch:
            rl = batch["ref_logps"].to(pc.dtype)
            rc, rr = rl[:pc.shape[0]], rl[pc.shape[0]:]
        else:
            rc, rr = ref(batch)
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta, ls, lt)
        return LossOutput(loss, int(pc.shape[0]), metrics)

    batches = PairBatches(train_p, d.batch_size, pad, seed=cfg.train.seed)
    val = pair_eval_batches(val_p, d.batch_size, pad) if val_p else None
    result = fit(model, batches, loss_fn, cfg.train, run_dir, val_data=val, save_model_fn=prep.save_fn,
                 tokenizer_dir=cfg.tokenizer or cfg.model, run_config=cfg)
    if val_p and result.stopped == "completed":
        atomic_write_json(run_dir / "dpo_eval.json", evaluate_pairs(model, val, loss_fn))
    return result


@torch.no_grad()
def evaluate_pairs(model: nn.Module, batches: Callable, loss_fn: Callable) -> dict[str, float]:
    """Pair-weighted mean loss, reward margin and preference accuracy over a pass of ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for b in batches():
        out = loss_fn(model, {k: v.to(device) for k, v in b.items()})
        sums["loss"] = sums.get("loss", 0.0) + float(out.loss) * out.num_tokens
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v * out.num_tokens
        n += out.num_tokens
    return {k: (v / n if n else math.nan) for k, v in sums.items()} | {"pairs": n}
