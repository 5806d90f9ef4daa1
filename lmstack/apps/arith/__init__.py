"""The RL arithmetic demonstration as an app (``recipes/rl-arithmetic.yaml``, ``app: arith``): a micro model
trained from nothing on two-digit arithmetic asked in English and Chinese, then GRPO and PPO with the
exact-answer reward, and held-out accuracy per language with confidence intervals (docs/rl.md)."""
