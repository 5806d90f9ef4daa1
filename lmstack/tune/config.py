"""Typed configs of ``lmstack finetune``, ``lmstack align dpo`` and ``lmstack distill``.

Each embeds :class:`lmstack.train.config.TrainConfig` as ``train:``, so ``--train.lr=1e-4`` means the same
thing in every stage; method sections (``lora:``, ``quant:``, ``prompt:``) are shared by all three.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from lmstack.config import StrictModel, read_yaml
from lmstack.train.config import TrainConfig

T = TypeVar("T", bound=StrictModel)
Method = Literal["full", "lora", "qlora", "prompt", "prefix"]


# Fine-tuning defaults that differ from pretraining's; a recipe's ``train:`` keys override them one by one.
FINETUNE_TRAIN_DEFAULTS = dict(steps=200, lr=2e-4, warmup_steps=10, weight_decay=0.0, eval_every=50,
                               ckpt_every=100, log_every=5)


def _finetune_train() -> TrainConfig:
    return TrainConfig(**FINETUNE_TRAIN_DEFAULTS)


class LoraSection(StrictModel):
    r: int = Field(16, ge=1, description="rank of the update B·A")
    alpha: float = Field(32.0, gt=0, description="scaling = alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description='linear layer names (last name component) or "all-linear"')
    use_rslora: bool = False
    layers_to_transform: list[int] | None = Field(
        None, description="decoder layers that get adapters (PEFT's layers_to_transform); negative numbers count "
        "from the top (-6 ... -1: the last six). Backpropagation stops below the lowest adapted layer, so "
        "adapting the top layers only trains faster (null: every layer)")
    init_from: str | None = Field(
        None, description="a saved LoRA adapter directory to continue training (its rank, alpha, target modules and "
        "layers must equal this section's; it must have been trained on the same base)")

    @field_validator("target_modules")
    @classmethod
    def _split(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str) and v != "all-linear":
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


class QuantSection(StrictModel):
    method: Literal["nf4", "int8"] = Field("nf4", description="QLoRA base weights: 4-bit NF4 or int8")
    group_size: int = Field(64, ge=2, description="NF4 block size (weights per absmax scale)")


class PromptSection(StrictModel):
    num_virtual_tokens: int = Field(20, ge=1)
    init: Literal["vocab", "random"] = "vocab"


class SFTDataSection(StrictModel):
    path: str = Field(..., description="JSONL/JSON: instruction, chat (messages) or ShareGPT records")
    val_path: str | None = Field(None, description="validation file; default: a val_fraction hold-out")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    max_len: int = Field(1024, ge=8, description="tokens per example (longer ones are truncated)")
    batch_size: int = Field(4, ge=1)
    packing: bool = Field(False, description="pack examples into rows of max_len (document-masked)")
    group_by_length: bool = Field(False, description="batch examples of similar length (each run of 50 batches "
                                  "sorted by length, the batches then shuffled): less padding, same examples per "
                                  "step (Hugging Face Trainer's group_by_length)")


class PairDataSection(StrictModel):
    path: str = Field(..., description="JSONL/JSON preference pairs: prompt / chosen / rejected")
    val_path: str | None = None
    val_fraction: float = Field(0.05, ge=0, lt=1)
    max_len: int = Field(1024, ge=8)
    batch_size: int = Field(2, ge=1, description="pairs per micro-batch")


class _Common(StrictModel):
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the model directory)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="frozen base weights: auto = fp32 on CPU, bf16 on CUDA for adapter methods")
    lora: LoraSection = Field(default_factory=LoraSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    prompt: PromptSection = Field(default_factory=PromptSection)
    train: TrainConfig = Field(default_factory=_finetune_train)

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            given = data["train"]
            merged = {**FINETUNE_TRAIN_DEFAULTS, **given}
            if "steps" in given and "warmup_steps" not in given and isinstance(given["steps"], int):
                merged["warmup_steps"] = min(FINETUNE_TRAIN_DEFAULTS["warmup_steps"], given["steps"] // 10)
            data = {**data, "train": merged}
        return data


class FinetuneConfig(_Common):
    run_dir: str = "runs/finetune"
    model: str = Field(..., description="base model directory (Hugging Face layout)")
    method: Method = "lora"
    data: SFTDataSection


class DPOSection(StrictModel):
    beta: float = Field(0.1, gt=0, description="KL strength: larger stays closer to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: assumed label noise")
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    reference: Literal["precompute", "live"] = Field(
        "precompute", description="precompute: one pass of the initial model before training (no copy in "
                                  "memory); live: a frozen copy (LoRA: the adapter switched off) each step")


class DPOConfig(_Common):
    run_dir: str = "runs/dpo"
    model: str = Field(..., description="the SFT model to align (also the reference)")
    method: Literal["full", "lora", "qlora"] = "lora"
    dpo: DPOSection = Field(default_factory=DPOSection)
    data: PairDataSection


class DistillSection(StrictModel):
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs the CE")


class DistillConfig(_Common):
    run_dir: str = "runs/distill"
    teacher: str = Field(..., description="teacher model directory (same vocabulary as the student)")
    student: str = Field(..., description="student model directory")
    method: Literal["full", "lora", "qlora"] = "full"
    distill: DistillSection = Field(default_factory=DistillSection)
    data: SFTDataSection


def load_stage_config(model: type[T], path: str | None, overrides: list[str], section: str = "finetune") -> T:
    """Read the config of ``lmstack finetune`` / ``align dpo`` / ``distill``: the stage config file itself, or
    section ``section`` of a recipe (``finetune``, ``dpo``, ``distill``), by the one rule of
    :func:`lmstack.config.stage_section` (the recipe's ``model`` fills ``model``; seed, device and dtype are
    defaults for ``train:``; ``run_dir`` defaults to ``runs/NAME/SECTION``)."""
    from lmstack.config import is_recipe, load_stage_config as load

    wired = {}
    if path:
        doc = read_yaml(path)
        if is_recipe(doc) and doc.get("model") is not None and "model" in model.model_fields:
            wired["model"] = doc["model"]
    return load(model, path, section, overrides, wired)
