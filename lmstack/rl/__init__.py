"""Reinforcement learning from feedback: a reward model (Bradley-Terry), PPO (RLHF) and GRPO, on lmstack's
models, LoRA adapters and serving engine (rollouts). Sits above ``serve`` in the import order (rollouts use
the engine); import submodules directly (``lmstack.rl.grpo``, ``lmstack.rl.losses``, ...). Guide: docs/rl.md.
"""
