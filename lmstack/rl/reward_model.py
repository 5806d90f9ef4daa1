"""``lmstack align reward``: a scalar reward head on an lmstack model, trained on preference pairs with the
Bradley-Terry loss (Ouyang et al. 2022, InstructGPT section 3.5; optional margin: Llama 2).

The reward of a sequence is ``score · h_last`` -- the final hidden state of its last token times a
(1, hidden) head, no bias. Saved as a Hugging Face ``{Llama,Qwen2,Qwen3,Mistral}ForSequenceClassification``
directory (``model.*`` backbone weights + ``score.weight``, ``num_labels: 1``), so
``transformers.AutoModelForSequenceClassification`` loads it and gives the same number (transformers takes
the last token that is not ``pad_token_id``; the pad id must not occur inside a sequence).

Reads top to bottom: tokenizer -> pairs -> backbone + head (zero-initialised: every reward starts at 0) ->
``lmstack.train.fit`` with the Bradley-Terry loss -> held-out pair accuracy in ``reward_eval.json`` -> final/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmstack.errors import CheckpointError
from lmstack.model import ModelConfig, load_model
from lmstack.model.hf_io import read_state_dict, save_model
from lmstack.model.transformer import Transformer
from lmstack.rl.config import RewardConfig
from lmstack.rl.losses import bradley_terry_loss
from lmstack.utils.io import atomic_write_json

SEQ_CLS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
           "qwen3": "Qwen3ForSequenceClassification", "mistral": "MistralForSequenceClassification"}


class RewardModel(nn.Module):
    """An lmstack Transformer and a (1, hidden) score head; ``forward`` -> rewards (B,)."""

    def __init__(self, backbone: Transformer, score: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        H = backbone.config.hidden_size
        p = next(backbone.parameters())
        self.score = score or nn.Linear(H, 1, bias=False, device=p.device, dtype=p.dtype)
        if score is None:
            nn.init.zeros_(self.score.weight)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Right-padded ``input_ids`` (B, T) -> the reward of each row (B,), read at its last real token."""
        mask = attention_mask
        h = self.backbone.hidden_states(input_ids, attention_mask=None if mask is None or bool(mask.all()) else mask)
        last = (mask.long().sum(1) - 1).clamp_min(0) if mask is not None else torch.full(
            (input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)
        return self.score(h_last).squeeze(-1).float()


def save_reward_model(rm: RewardModel, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """The HF ``...ForSequenceClassification`` layout: backbone ``model.*`` + ``score.weight``."""
    out = Path(out)
    mt = rm.config.model_type
    if mt not in SEQ_CLS:
        raise CheckpointError(f"a reward model on model_type {mt!r} has no transformers class; "
                              f"supported: {', '.join(SEQ_CLS)}")
    sd = {k: v for k, v in rm.backbone.state_dict().items() if not k.startswith("lm_head.")}
    sd["score.weight"] = rm.score.weight
    save_model(rm.backbone, out, tokenizer_dir=tokenizer_dir, state_dict=sd)
    cfg_path = out / "config.json"
    hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    hf.update(architectures=[SEQ_CLS[mt]], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
              problem_type="regression")
    if hf.get("pad_token_id") is None:
        hf["pad_token_id"] = hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int) else 0
    atomic_write_json(cfg_path, hf)
    return out


def load_reward_model(path: str | Path, device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None) -> RewardModel:
    """A directory written by :func:`save_reward_model` (or any HF ``...ForSequenceClassification`` with one
    label of a supported family)."""
    from lmstack.model.hf_io import build_model

    path = Path(path)
    cfg = ModelConfig.from_hf(path)
    sd = read_state_dict(path)
    if "score.weight" not in sd:
        raise CheckpointError(f"{path}: no score.weight; not a reward model (train one with `lmstack align reward`)")
    score_w = sd.pop("score.weight")
    if score_w.shape != (1, cfg.hidden_size):
        raise CheckpointError(f"{path}: score.weight has shape {tuple(score_w.shape)}; a reward model has "
                              f"(1, {cfg.hidden_size})")
    model = build_model(cfg, device=device, dtype=dtype)
    dt = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict({k: v.to(dev, dt) for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    model.tie_weights()
    head = nn.Linear(cfg.hidden_size, 1, bias=False, device=dev, dtype=dt)
    with torch.no_grad():
        head.weight.copy_(score_w)
    return RewardModel(model.eval(), head).eval()


def pair_rewards(rm: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards (B,) from one forward over the (2B, T) pair batch."""
    r = rm(batch["input_ids"], batch["attention_mask"])
    B = r.shape[0] // 2
    return r[:B], r[B:]


def train_reward(cfg: RewardConfig) -> Any:
    from lmstack.train import LossOutput, fit
    from lmstack.train.config import TrainConfig
    from lmstack.tune.batches import PairBatches, pair_eval_batches
    from lmstack.tune.data import load_pairs
    from lmstack.tune.dpo import evaluate_pairs
    from lmstack.tune.sft import console, load_splits, load_tokenizer, pad_id_of
    from lmstack.utils.device import resolve_device

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    pad = pad_id_of(tok)
    d = cfg.data
    t = cfg.train
    train_p, val_p = load_splits(d, tok, cfg.model, t.seed, run_dir, load=load_pairs)
    console.print(f"[bold]data[/bold] {len(train_p)} train / {len(val_p)} held-out pairs")
    dev = resolve_device(t.device)
    backbone = load_model(cfg.model, device=dev, dtype=torch.float32)
    rm = RewardModel(backbone)
    for p in backbone.parameters():
        p.requires_grad_(cfg.reward.train_layers is None)
    if cfg.reward.train_layers is not None:
        for layer in backbone.model.layers[-cfg.reward.train_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in backbone.model.norm.parameters():
            p.requires_grad_(True)
    margin = cfg.reward.margin

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        rc, rr = pair_rewards(m, batch)
        loss, metrics = bradley_terry_loss(rc, rr, margin)
        return LossOutput(loss, int(rc.shape[0]), metrics)

    tok_dir = cfg.tokenizer or cfg.model
    tc = TrainConfig(steps=t.steps, lr=t.lr, weight_decay=t.weight_decay, clip_grad_norm=t.max_grad_norm, seed=t.seed,
                     device=t.device, log_every=t.log_every, eval_every=t.eval_every,
                     warmup_steps=min(10, t.steps // 10), ckpt_every=0,
                     tensorboard=False, peak_flops=1e12)  # peak_flops given: no matmul benchmark at start
    val = pair_eval_batches(val_p, d.batch_size, pad) if val_p else None
    if val and not bool(rm.score.weight.any()):
        # a zero head scores every response 0: the "before" numbers are known without a pass over the pairs
        # (which costs as much as ~1/8 of the training on a CPU)
        zero = torch.zeros(len(val_p))
        loss0, met0 = bradley_terry_loss(zero, zero, margin)
        before = {"loss": float(loss0), **met0, "pairs": len(val_p)}
    else:
        before = evaluate_pairs(rm, val, loss_fn) if val else {}
    res = fit(rm, PairBatches(train_p, d.batch_size, pad, seed=t.seed), loss_fn, tc, run_dir, val_data=val,
              params=[p for p in rm.parameters() if p.requires_grad],
              save_model_fn=lambda m, out: save_reward_model(m, out, tok_dir), tokenizer_dir=tok_dir, run_config=cfg)
    if val and res.stopped == "completed":
        after = evaluate_pairs(rm, val, loss_fn)
        atomic_write_json(run_dir / "reward_eval.json", {"before": before, "after": after})
        console.print(f"[bold]held-out pairs[/bold] accuracy {before.get('accuracy', 0):.3f} -> "
                      f"{after.get('accuracy', 0):.3f} ({after.get('pairs')} pairs)")
    return res
