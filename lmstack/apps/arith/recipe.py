"""The arith app's recipe sections: ``data``, ``model`` and ``report``; ``finetune``, ``grpo`` and ``ppo`` are the
library's own configs (:class:`lmstack.tune.config.FinetuneConfig`, :class:`lmstack.rl.config.GRPOConfig`,
:class:`lmstack.rl.config.PPOConfig`), wired to this app's files."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from lmstack.config import StrictModel


class DataStage(StrictModel):
    n_sft: int = Field(6000, ge=1, description="supervised chats (the question and the bare answer)")
    n_train: int = Field(2000, ge=1, description="RL prompts (question + answer for the reward)")
    n_heldout: int = Field(400, ge=1, description="held-out questions (disjoint from SFT and RL), scored greedily")
    digits: int = Field(2, ge=1, le=6, description="operand digits")
    ops: str = Field("+-", pattern=r"^[+\-*]{1,3}$", description="operators: some of + - * (× takes one digit)")
    zh_fraction: float = Field(0.5, ge=0, le=1, description="share of prompts asked in Chinese")


class ModelStage(StrictModel):
    vocab_size: int = Field(512, ge=300, description="byte-level BPE, every digit its own token")
    preset: str = Field("micro", description="lmstack.model preset the shape starts from")
    shape: dict[str, Any] = Field(default_factory=lambda: {
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}, description="overrides of the preset (ModelConfig fields)")
    max_position_embeddings: int = Field(128, ge=32)
    threads: int | None = Field(1, ge=1, description="torch.set_num_threads for the model and finetune stages "
                                "(1: a tiny model's steps are faster on one thread on a shared 2-core CPU)")


class ReportStage(StrictModel):
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the Wilson intervals")
