"""Fine-tune and run a T5-family encoder-decoder on input -> output pairs (``lmstack seq2seq train|generate``).

Data: JSON Lines records ``{"input": ..., "output": ...}`` (``source`` / ``target`` and ``prompt`` / ``completion``
are accepted too). The input is encoded with the tokenizer's own special tokens (T5's adds ``</s>``), the output
gets the model's eos appended; the loss is the mean token cross-entropy over output tokens (teacher forcing,
decoder inputs = labels shifted right after ``decoder_start_token_id``), as ``T5ForConditionalGeneration``.

Full fine-tuning trains every weight; LoRA (``lora_r > 0``) freezes them and trains low-rank adapters on the
chosen projections (T5 names: ``q``, ``k``, ``v``, ``o``, ``wi``, ``wi_0``, ``wi_1``, ``wo``; default q and v),
then merges them, so the output directory is always a plain HF T5 directory that ``lmstack generate`` and
``transformers`` load. The loop is a plain AdamW loop (no checkpoints or resume: runs are short).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lmstack.errors import ConfigError, DataError
from lmstack.model.seq2seq import Seq2Seq, load_seq2seq, save_seq2seq
from lmstack.tokenizer import Tokenizer
from lmstack.tune.lora import LoraSpec, apply_lora, count_parameters, merge_lora
from lmstack.utils.io import iter_jsonl_lines

_KEYS = (("input", "output"), ("source", "target"), ("prompt", "completion"))
MAX_RECORDS = 1_000_000


@dataclass
class Seq2SeqTrainConfig:
    model: str
    data: str
    out: str
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 8
    max_source_len: int = 512
    max_target_len: int = 128
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_source_len", "max_target_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0, got {self.lora_r}")


def load_pairs(path: str | Path, tok: Tokenizer, eos_id: int, max_src: int, max_tgt: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, output ids + eos) per usable record; raises DataError naming the file when none is usable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    bad: list[str] = []
    out: list[tuple[list[int], list[int]]] = []
    for lineno, rec in iter_jsonl_lines(path, lambda n, why: bad.append(f"{path}:{n}: {why}")):
        keys = next((k for k in _KEYS if isinstance(rec, dict) and isinstance(rec.get(k[0]), str)
                     and isinstance(rec.get(k[1]), str)), None)
        if keys is None:
            bad.append(f"{path}:{lineno}: expected {{\"input\": str, \"output\": str}}")
            continue
        src = tok.encode(rec[keys[0]], add_special_tokens=True)[:max_src]
        tgt = (tok.encode(rec[keys[1]], add_special_tokens=False) + [eos_id])[-max_tgt:]
        out.append((src, tgt))
        if len(out) > MAX_RECORDS:
            raise DataError(f"{path}: more than {MAX_RECORDS} records")
    if not out:
        raise DataError(f"{path}: no usable input/output record" + (f" (first problem: {bad[0]})" if bad else ""))
    return out


def collate(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask (B, S) and labels (B, T) with -100 on padding."""
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    ids = torch.full((len(pairs), S), pad, dtype=torch.long)
    mask = torch.zeros(len(pairs), S, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq2seq_loss(model: Seq2Seq, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"]
    logits = model(batch["input_ids"], model.shift_right(labels), batch["attention_mask"])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def train_seq2seq(cfg: Seq2SeqTrainConfig, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write the (merged) model to ``cfg.out``. Returns
    ``{"first_loss", "last_loss", "trainable", "total", "out"}``."""
    torch.manual_seed(cfg.seed)
    model = load_seq2seq(cfg.model, device=cfg.device or "cpu", dtype="float32")
    tok = Tokenizer.from_dir(cfg.model)
    eos = model.config.eos_token_id
    pairs = load_pairs(cfg.data, tok, eos[0] if isinstance(eos, list) else eos, cfg.max_source_len,
                       cfg.max_target_len)
    if cfg.lora_r:
        apply_lora(model, LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets))
    trainable, total = count_parameters(model)
    log(f"seq2seq: {len(pairs)} pairs, {'LoRA r=' + str(cfg.lora_r) if cfg.lora_r else 'full'} fine-tuning, "
        f"{trainable:,} of {total:,} parameters train")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    model.train()
    losses: list[float] = []
    dev = model.device
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        batch = {k: v.to(dev) for k, v in collate([pairs[i] for i in idx], model.config.pad_token_id).items()}
        loss = seq2seq_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step == 1 or step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps} loss {losses[-1]:.4f}")
    model.eval()
    if cfg.lora_r:
        merge_lora(model)
    save_seq2seq(model, cfg.out, tokenizer_dir=cfg.model)
    return {"first_loss": losses[0], "last_loss": losses[-1], "trainable": trainable, "total": total,
            "out": str(cfg.out)}


def generate_text(model: Seq2Seq | str | Path, prompts: list[str], *, tokenizer: Tokenizer | None = None,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  device: str | None = None, dtype: str | None = None) -> list[str]:
    """Decode one output text per prompt (the encoder runs once; the decoder keeps its KV cache)."""
    if not isinstance(model, Seq2Seq):
        tokenizer = tokenizer or Tokenizer.from_dir(model)
        model = load_seq2seq(model, device=device, dtype=dtype)
    if tokenizer is None:
        raise ConfigError("generate_text needs a tokenizer with a loaded model")
    enc = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    batch = collate([(e, [0]) for e in enc], model.config.pad_token_id)
    ids = model.generate(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device),
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
