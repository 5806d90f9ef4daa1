"""Fine-tuning and alignment: LoRA / QLoRA / prompt / prefix as module swaps, SFT, DPO, distillation, merge.

Import submodules directly (``lmstack.tune.lora``, ``lmstack.tune.adapters``, ...); this package keeps its
top level light so ``lmstack.tune.adapters.load_adapter`` is cheap for the serving engine.
"""
