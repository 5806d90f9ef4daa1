"""Typed configs for the training loop (:class:`TrainConfig`) and for pretraining (:class:`PretrainConfig`).

``TrainConfig`` is what :func:`lmstack.train.fit` reads; every training stage (pretrain, full fine-tune, LoRA,
QLoRA, prefix, SFT, DPO, distillation) embeds it as its ``train:`` section, so the recipe keys and the
``--train.lr=3e-4`` overrides are the same everywhere. Defaults work on a laptop CPU.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from lmstack.config import StrictModel


class TrainConfig(StrictModel):
    # ---- length
    steps: int = Field(1000, ge=1, description="optimizer steps to run (total, counting resumed ones)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (per process)")
    # ---- optimizer: AdamW with weight-decay groups (no decay on norms, biases and other 1-D params)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr = lr * min_lr_ratio")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    fused: Literal["auto", "fused", "foreach", "off"] = "auto"
    clip_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    # ---- schedule
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    # ---- cadence (in optimizer steps; 0 disables)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=0)
    eval_batches: int = Field(20, ge=1, description="validation batches per evaluation")
    ckpt_every: int = Field(500, ge=0)
    keep_last: int = Field(3, ge=1, description="checkpoints kept (older ones are deleted)")
    resume: str | None = Field(None, description='"auto" (newest checkpoint of run_dir, if any) or a path')
    # ---- numerics and speed
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA with bf16 support, fp32 elsewhere")
    compile: bool = False
    activation_checkpointing: bool = False
    max_bad_steps: int = Field(5, ge=1, description="stop after this many NaN/inf steps in a row")
    # ---- scale out (under torchrun)
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="auto: ddp when launched by torchrun with >1 process, else none")
    tp_size: int = Field(1, ge=1, description="tensor-parallel ranks per model replica (DTensor); the other "
                         "processes form the data-parallel dimension (FSDP2 on a 2-D mesh)")
    # ---- outputs
    save_final: bool = True
    tensorboard: bool = True
    plot: bool = True
    peak_flops: float | None = Field(None, gt=0, description="FLOP/s for MFU; None measures a matmul")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps and self.schedule != "constant" and self.steps > 1:
            # allowed but almost always a mistake in a recipe: fail early with the fix
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps}); "
                             "lower train.warmup_steps or raise train.steps")
        return self


class ModelSection(StrictModel):
    arch: Literal["decoder", "encoder"] = Field(
        "decoder", description="decoder: causal LM (the Transformer); encoder: BERT-style masked-LM pretraining "
        "(presets bert-tiny / bert-mini / bert-small / modernbert-tiny / modernbert-mini, or from_dir a BERT or "
        "ModernBERT directory)")
    preset: str | None = Field("tiny", description="train from scratch from a named preset")
    from_dir: str | None = Field(None, description="continue pretraining a Hugging Face model directory")
    overrides: dict[str, int | float | str | bool | None] = Field(
        default_factory=dict, description="ModelConfig fields to change on the preset")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="encoder: share of tokens selected for MLM "
                                   "(of those 80% -> mask token, 10% random, 10% kept)")
    mask_token: str | None = Field(None, description="encoder: the mask token's text (default: [MASK] or <mask> "
                                   "from the shards' tokenizer)")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if self.from_dir is not None:
            self.preset = None
        if self.arch == "encoder" and self.preset == "tiny" and "preset" not in self.model_fields_set:
            self.preset = "bert-tiny"
        if self.preset is None and self.from_dir is None:
            raise ValueError("set model.preset (from scratch) or model.from_dir (continued pretraining)")
        return self


class DataSection(StrictModel):
    shards: str = Field(..., description="a token-shard directory written by `lmstack data tokenize`")
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1, description="micro-batch per process")
    val_windows: int = Field(64, ge=0, description="held-out windows when the shards have no val split")
    replay: Optional[str] = Field(None, description="continued pretraining: token shards of general data to replay "
                                  "(same tokenizer as `shards`)")
    replay_share: float = Field(0.0, ge=0, le=1, description="share of each batch's rows drawn from `replay`")

    @model_validator(mode="after")
    def _replay(self) -> "DataSection":
        if self.replay_share > 0 and not self.replay:
            raise ValueError("data.replay_share > 0 needs data.replay (a token-shard directory of general data)")
        return self


class PretrainConfig(StrictModel):
    run_dir: str = "runs/pretrain"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainConfig = Field(default_factory=TrainConfig)


def load_pretrain_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read the config of ``lmstack pretrain``: a :class:`PretrainConfig` file itself, or the ``pretrain:``
    section of a recipe, by the one rule of :func:`lmstack.config.stage_section` (the recipe's seed, device and
    dtype are defaults for ``train:``; ``run_dir`` defaults to ``runs/NAME/pretrain``). Overrides address
    PretrainConfig fields: ``train.lr=3e-4``, ``data.shards=DIR``, ``run_dir=runs/x``."""
    from lmstack.config import load_stage_config

    return load_stage_config(PretrainConfig, path, "pretrain", overrides)
