"""Tiny random checkpoints of every decoder family (dense ones from conftest, MoE ones here), built and saved
with transformers: the reference side of the model parity tests."""

from __future__ import annotations

import torch

from tests.conftest import ARCHS, tiny_hf_config

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
ALL_ARCHS = ARCHS + MOE_ARCHS


def tiny_config(arch: str, **kw):
    """A 2-layer, 64-wide config; MoE families get 4 experts, top-2 (Qwen2-MoE: plus a shared expert)."""
    import transformers

    if arch in ARCHS:
        return tiny_hf_config(arch, **kw)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    per_arch = {
        "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2,
                                                    intermediate_size=48, head_dim=16, tie_word_embeddings=False)),
        "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                                       tie_word_embeddings=True)),
        "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, head_dim=32,
                                                       moe_intermediate_size=32, norm_topk_prob=True,
                                                       tie_word_embeddings=False)),
    }
    cls, defaults = per_arch[arch]
    return cls(**{**common, **defaults, **kw})


def make_model(arch: str, path, seed: int = 0, **kw):
    """Build a random transformers model of any family, save it under ``path`` and return it (fp32, eval).
    Biases and norm weights are randomised too, so a missing bias or a wrong norm shows in the logits."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith(("mlp.gate.weight", "moe.gate.weight")):
                p.normal_(0, 0.5)  # router logits far enough apart that top-k ties cannot flip
    model.save_pretrained(path)
    return model
