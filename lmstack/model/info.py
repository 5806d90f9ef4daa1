"""Summaries of a model directory for ``lmstack info`` (no weights are loaded).

``info`` runs the checks loading runs — :meth:`ModelConfig.from_hf` (every numerics-changing field honoured or
refused) and :func:`check_weights` on the safetensors headers — so it never describes a model that loading
then refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import check_weights, tensor_shapes

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def model_info(path: str | Path) -> dict[str, Any]:
    cfg = ModelConfig.from_hf(path)
    check_weights(path, cfg, tensor_shapes(Path(path)))  # the same check as load_model
    n = cfg.num_parameters()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    fields = {
        "model_type": cfg.model_type,
        "parameters": f"{n:,} ({n / 1e6:.1f}M)",
        "layers": cfg.num_hidden_layers,
        "hidden / intermediate": f"{cfg.hidden_size} / {cfg.intermediate_size}",
        "heads (q / kv)": f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}"
        + (" (GQA)" if 1 < cfg.n_rep < cfg.num_attention_heads else " (MQA)" if cfg.num_key_value_heads == 1 else " (MHA)"),
        "head_dim": cfg.head_dim,
        "vocab": cfg.vocab_size,
        "max positions": cfg.max_position_embeddings,
        "rope theta / scaling": f"{cfg.rope_theta:g} / {cfg.rope_scaling or 'none'}",
        "q/k/v bias, q/k norm": f"{cfg.attention_bias}, {cfg.qk_norm}",
        "sliding window": cfg.sliding_window,
        "o_proj / MLP bias": f"{cfg.attention_out_bias}, {cfg.mlp_bias}",
        "tied embeddings": cfg.tie_word_embeddings,
        "stored dtype": cfg.torch_dtype,
        "KV cache per token (fp16)": human_bytes(kv_per_token * 2),
    }
    if cfg.num_experts:
        a = cfg.num_parameters(active_only=True)
        fields["experts (routed / per token / shared)"] = (
            f"{cfg.num_experts} / top-{cfg.num_experts_per_tok} / "
            f"{'1 gated' if cfg.shared_expert_intermediate_size else 'none'}")
        fields["active parameters per token"] = f"{a:,} ({a / 1e6:.1f}M)"
    memory = {k: human_bytes(n * b) for k, b in BYTES_PER_PARAM.items()}
    return {"config": cfg, "fields": fields, "memory": memory, "num_parameters": n}
