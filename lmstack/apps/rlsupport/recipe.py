"""The rlsupport app's recipe sections: ``pairs``, ``policy``, ``eval``; ``reward`` and ``ppo`` are the library's
configs (:class:`lmstack.rl.config.RewardConfig`, :class:`lmstack.rl.config.PPOConfig`)."""

from __future__ import annotations

from pydantic import Field

from lmstack.config import StrictModel


class PairsStage(StrictModel):
    support_run: str = Field("runs/quickstart", description="a finished support run (lmstack run "
                             "recipes/quickstart.yaml): its rag/ chats and held-out questions, base/ and finetune/")
    train_pairs: int = Field(400, ge=1, description="pairs from the support chats (one per chat, kinds in turn)")
    heldout_pairs: int = Field(120, ge=1, description="pairs from the held-out questions (never trained on)")
    ppo_prompts: int = Field(400, ge=1, description="PPO prompts (chats' questions with their passages)")
    heldout_prompts: int = Field(60, ge=1, description="held-out questions scored before / after PPO")


class PolicyStage(StrictModel):
    reward_layers: int | None = Field(6, ge=1, description="the reward model's backbone: the SFT model's first N "
                                      "decoder layers (same tokenizer, N/30 of the cost on a CPU); null: all")


class EvalStage(StrictModel):
    max_tokens: int = Field(48, ge=4, le=256)
    threads: int | None = Field(None, ge=1)
