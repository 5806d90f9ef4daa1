"""RLHF on the support assistant (``recipes/rl-support.yaml``, ``app: rlsupport``): preference pairs built from a
finished support run's grounded chats (the answer citing the right passage vs a wrong passage, a wrong
citation, a changed number, an ungrounded reply), a Bradley-Terry reward model, PPO on the assistant's LoRA,
and the support scores (EM, F1, citations) before and after."""
