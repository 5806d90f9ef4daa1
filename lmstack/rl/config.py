"""Typed configs of ``lmstack align reward|ppo|grpo`` (recipe sections ``reward:``, ``ppo:``, ``grpo:``).

The policy sections reuse the fine-tuning ``lora:`` section; a bad value fails before any model loads, with
the field name (``grpo.group_size: must be >= 2 ...``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmstack.config import StrictModel
from lmstack.tune.config import LoraSection, PairDataSection


class RLTrainSection(StrictModel):
    steps: int = Field(50, ge=1, description="policy updates (one rollout batch each)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "fp32"] = Field("auto", description="the policy trains in fp32 (auto = fp32)")
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(10, ge=0, description="held-out reward every N steps (0: only before and after)")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads for the run (null: torch's default; "
                                "1 is faster for a tiny model on a shared CPU)")


class RolloutSection(StrictModel):
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts; the ratio uses the "
                               "policy's log-probs at this temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    max_num_seqs: int = Field(64, ge=1, description="engine batch (sequences decoded together)")
    kv_cache_memory: int = Field(256 << 20, ge=1 << 16, description="bytes of the rollout engine's paged KV pool")


class PromptDataSection(StrictModel):
    path: str = Field(..., description="JSONL: {\"prompt\": str or chat messages, ...fields the reward reads}")
    val_path: str | None = Field(None, description="held-out prompts scored greedily before, during and after")
    val_limit: int = Field(64, ge=0, description="held-out prompts scored (0: none)")
    chat: bool = Field(True, description="wrap a string prompt as one user message of the chat template")
    max_prompt_len: int = Field(256, ge=4)


class RewardSpec(StrictModel):
    function: str | None = Field(None, description="a verifiable reward: exact_answer | json_schema | unit_tests "
                                 "| module.path:function")
    model: str | None = Field(None, description="a reward model directory (lmstack align reward)")
    schema_: dict | None = Field(None, alias="schema", description="json_schema: the schema (or each record's)")

    @model_validator(mode="after")
    def _one(self) -> "RewardSpec":
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of reward.function (exact_answer, json_schema, unit_tests, "
                             "module:function) or reward.model (a reward model directory)")
        return self


class _Policy(StrictModel):
    model: str = Field(..., description="the (SFT) policy; with LoRA also the reference (adapter off)")
    tokenizer: str | None = None
    method: Literal["lora", "full"] = Field("lora", description="lora: the reference is the base with the "
                                            "adapter off (one copy of the weights); full: a frozen copy")
    lora: LoraSection = Field(default_factory=lambda: LoraSection(dropout=0.0))
    data: PromptDataSection
    reward: RewardSpec | None = Field(None, description="what scores a response: reward.function or reward.model")
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    train: RLTrainSection = Field(default_factory=RLTrainSection)


    @model_validator(mode="after")
    def _needs_reward(self) -> "_Policy":
        if self.reward is None:
            raise ValueError("reward: missing; set reward.function (exact_answer, json_schema, unit_tests, "
                             "module:function; --reward-fn) or reward.model (a reward model dir; --reward-model)")
        return self


class GRPOSection(StrictModel):
    group_size: int = Field(4, ge=2, description="responses sampled per prompt (>= 2: the advantage is relative "
                            "to the group)")
    prompts_per_step: int = Field(4, ge=1)
    beta: float = Field(0.04, ge=0, description="KL coefficient (k3 estimator to the reference); 0: no reference")
    epsilon: float = Field(0.2, gt=0, lt=1, description="clip range (low side)")
    epsilon_high: float | None = Field(None, gt=0, description="DAPO's clip-higher (default: epsilon)")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    scale_rewards: bool = Field(True, description="divide advantages by the group std (Dr. GRPO: false)")
    num_iterations: int = Field(1, ge=1, description="optimisation passes over each rollout batch (μ)")
    minibatches: int = Field(1, ge=1)


class GRPOConfig(_Policy):
    run_dir: str = "runs/grpo"
    grpo: GRPOSection = Field(default_factory=GRPOSection)


class PPOSection(StrictModel):
    prompts_per_step: int = Field(8, ge=1)
    kl_coef: float = Field(0.05, ge=0, description="initial β of the per-token KL penalty")
    target_kl: float | None = Field(None, gt=0, description="adaptive β (Ziegler et al.); null: fixed")
    horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0, lt=1)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    ppo_epochs: int = Field(2, ge=1)
    minibatches: int = Field(1, ge=1)
    whiten_advantages: bool = True
    whiten_rewards: bool = False


class PPOConfig(_Policy):
    run_dir: str = "runs/ppo"
    ppo: PPOSection = Field(default_factory=PPOSection)


class RewardTrainSection(RLTrainSection):
    steps: int = Field(100, ge=1)
    lr: float = Field(5e-5, gt=0)
    eval_every: int = Field(0, ge=0)


class RewardModelSection(StrictModel):
    margin: float = Field(0.0, ge=0, description="Llama 2's margin m in -log σ(r_w - r_l - m)")
    train_layers: int | None = Field(None, ge=1, description="train only the top N decoder layers (+ the head); "
                                     "null: all")


class RewardConfig(StrictModel):
    run_dir: str = "runs/reward"
    model: str = Field(..., description="the backbone: a causal LM directory (usually the SFT model)")
    tokenizer: str | None = None
    data: PairDataSection
    reward: RewardModelSection = Field(default_factory=RewardModelSection)
    train: RewardTrainSection = Field(default_factory=RewardTrainSection)
