"""How an lmstack / Hugging Face decoder is laid out inside a GGUF file: tensor names, the Q/K row order, config keys.

References: the GGUF specification (ggml ``docs/gguf.md``), the tensor and key names of the ``gguf`` package
(``gguf.TENSOR_NAMES``, ``gguf.Keys``), and llama.cpp's model graphs, which read them.

* Names: ``model.layers.3.self_attn.q_proj.weight`` <-> ``blk.3.attn_q.weight`` (taken from ``gguf.TENSOR_NAMES``).
* RoPE layout: Hugging Face rotates the two *halves* of each head (``rotate_half``: dims ``i`` and ``i + D/2``
  form a pair); llama.cpp's ``llama`` architecture rotates *adjacent* pairs (dims ``2i`` and ``2i + 1``, GPT-J
  style). The rows of ``q_proj`` / ``k_proj`` (and their biases) are therefore reordered per head so that
  adjacent rows in the file are the pairs HF rotates together::

      hf   rows of one head: [a0 a1 ... a(D/2-1) | b0 b1 ... b(D/2-1)]   (pair i = (a_i, b_i))
      gguf rows of one head: [a0 b0 a1 b1 ... a(D/2-1) b(D/2-1)]

  ``qwen2`` / ``qwen3`` run NEOX-style RoPE in llama.cpp (the HF convention), so they are stored unpermuted.
* Mistral is written as llama.cpp does (architecture ``llama``); its sliding window goes under
  ``llama.attention.sliding_window`` so that importing the file gives back a ``mistral`` config.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from lmstack.errors import CheckpointError
from lmstack.model.config import ModelConfig

# lmstack model_type -> GGUF general.architecture (llama.cpp has no separate Mistral graph for these models)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")  # gemma3: import only
ROPE_PERMUTED_ARCHS = ("llama",)  # llama.cpp rotates adjacent pairs for these

# HF per-layer suffix -> gguf.MODEL_TENSOR member name (the GGUF name comes from gguf.TENSOR_NAMES)
_LAYER_TENSORS = {
    "input_layernorm.weight": ("ATTN_NORM", "weight"),
    "self_attn.q_proj.weight": ("ATTN_Q", "weight"),
    "self_attn.k_proj.weight": ("ATTN_K", "weight"),
    "self_attn.v_proj.weight": ("ATTN_V", "weight"),
    "self_attn.q_proj.bias": ("ATTN_Q", "bias"),
    "self_attn.k_proj.bias": ("ATTN_K", "bias"),
    "self_attn.v_proj.bias": ("ATTN_V", "bias"),
    "self_attn.o_proj.weight": ("ATTN_OUT", "weight"),
    "self_attn.q_norm.weight": ("ATTN_Q_NORM", "weight"),
    "self_attn.k_norm.weight": ("ATTN_K_NORM", "weight"),
    "post_attention_layernorm.weight": ("FFN_NORM", "weight"),
    "mlp.gate_proj.weight": ("FFN_GATE", "weight"),
    "mlp.up_proj.weight": ("FFN_UP", "weight"),
    "mlp.down_proj.weight": ("FFN_DOWN", "weight"),
}
# Gemma 3 (import only): four norms per layer, under their own GGUF names; ``ffn_norm`` is the pre-MLP norm
_GEMMA3_LAYER_TENSORS = {
    **{k: v for k, v in _LAYER_TENSORS.items() if k != "post_attention_layernorm.weight"},
    "post_attention_layernorm.weight": ("ATTN_POST_NORM", "weight"),
    "pre_feedforward_layernorm.weight": ("FFN_PRE_NORM", "weight"),
    "post_feedforward_layernorm.weight": ("FFN_POST_NORM", "weight"),
}
GEMMA_SWA_PATTERN = 6  # llama.cpp's default for gemma3 files without attention.sliding_window_pattern
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("TOKEN_EMBD", "weight"),
    "model.norm.weight": ("OUTPUT_NORM", "weight"),
    "lm_head.weight": ("OUTPUT", "weight"),
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _gguf_base(member: str) -> str:
    import gguf

    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, member)]


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None for a name GGUF has no slot for."""
    layer_tensors = _GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
    if hf_name in _GLOBAL_TENSORS:
        member, kind = _GLOBAL_TENSORS[hf_name]
        return f"{_gguf_base(member)}.{kind}"
    m = _HF_LAYER.match(hf_name)
    if m and m.group(2) in layer_tensors:
        member, kind = layer_tensors[m.group(2)]
        return f"{_gguf_base(member).format(bid=int(m.group(1)))}.{kind}"
    return None


def hf_name_table(num_layers: int, arch: str = "llama") -> dict[str, str]:
    """Every GGUF tensor name lmstack knows for a model of ``num_layers`` layers -> its HF name."""
    layer_tensors = _GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
    table = {gguf_tensor_name(k, arch): k for k in _GLOBAL_TENSORS}
    for i in range(num_layers):
        for suffix in layer_tensors:
            hf = f"model.layers.{i}.{suffix}"
            table[gguf_tensor_name(hf, arch)] = hf
    return table


def is_norm_shifted(arch: str, hf_name: str) -> bool:
    """llama.cpp's converter stores Gemma's (1 + w) RMSNorm weights as 1 + w: import subtracts the 1 again."""
    return arch == "gemma3" and hf_name.endswith(("norm.weight", "layernorm.weight"))


def is_rope_permuted(hf_name: str) -> bool:
    return hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                             "self_attn.q_proj.bias", "self_attn.k_proj.bias"))


def permute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """HF half-split rows -> llama.cpp interleaved rows, per head. w: (n_heads * D, ...) or (n_heads * D,)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of :func:`permute_rope_rows`: llama.cpp interleaved rows -> HF half-split rows."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_heads(cfg: ModelConfig, hf_name: str) -> int:
    return cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads


# ---------------------------------------------------------------------------------------------- config keys
def config_to_gguf_kv(cfg: ModelConfig) -> dict[str, Any]:
    """The ``{arch}.*`` hyperparameter keys llama.cpp reads for this config (values as Python scalars)."""
    arch = GGUF_ARCH[cfg.model_type]
    if cfg.rope_scaling:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        if kind != "linear":
            raise CheckpointError(
                f"rope_scaling {kind!r} cannot be written to GGUF by lmstack yet (only linear); "
                "export a model without rope_scaling")
    kv: dict[str, Any] = {
        f"{arch}.context_length": int(cfg.max_position_embeddings),
        f"{arch}.embedding_length": int(cfg.hidden_size),
        f"{arch}.block_count": int(cfg.num_hidden_layers),
        f"{arch}.feed_forward_length": int(cfg.intermediate_size),
        f"{arch}.attention.head_count": int(cfg.num_attention_heads),
        f"{arch}.attention.head_count_kv": int(cfg.num_key_value_heads),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.rope.freq_base": float(cfg.rope_theta),
        f"{arch}.rope.dimension_count": int(cfg.head_dim),
        f"{arch}.attention.key_length": int(cfg.head_dim),
        f"{arch}.attention.value_length": int(cfg.head_dim),
        f"{arch}.vocab_size": int(cfg.vocab_size),
    }
    if cfg.rope_scaling:
        kv[f"{arch}.rope.scaling.type"] = "linear"
        kv[f"{arch}.rope.scaling.factor"] = float(cfg.rope_scaling["factor"])
    if cfg.sliding_window is not None:
        kv[f"{arch}.attention.sliding_window"] = int(cfg.sliding_window)
    return kv


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], where: str) -> ModelConfig:
    """A :class:`ModelConfig` from a GGUF's metadata (``meta``: key -> scalar / list) and its tensor names."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise CheckpointError(f'{where}: GGUF architecture "{arch}" is not supported; supported: '
                              f'{", ".join(SUPPORTED_GGUF_ARCHS)}')

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if required and v is None:
            raise CheckpointError(f"{where}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise CheckpointError(f"{where}: {arch}.{key} varies per layer ({v[:4]}...), which lmstack "
                                      "does not support")
            v = v[0]
        return v

    hidden = int(get("embedding_length", required=True))
    n_heads = int(get("attention.head_count", required=True))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{where}: key_length and value_length differ; lmstack needs one head_dim")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{where}: partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
                              f"{head_dim}) are not supported")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{where}: the file carries per-frequency RoPE factors (rope_freqs.weight, "
                              "Llama-3.1 style scaling), which lmstack cannot import yet")
    rope_scaling = None
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(f"{where}: rope scaling {scaling!r} is not supported (only linear)")
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", required=True))}
    n_vocab = meta.get(f"{arch}.vocab_size")
    if n_vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens is not None else None
    if n_vocab is None:
        raise CheckpointError(f"{where}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokens)")
    sliding = get("attention.sliding_window")
    model_type = arch
    if arch == "llama" and sliding is not None:
        model_type = "mistral"
    eos = meta.get("tokenizer.ggml.eos_token_id")
    gemma: dict[str, Any] = {}
    if arch == "gemma3":
        model_type = "gemma3_text"
        n_layers = int(get("block_count", required=True))
        pattern = meta.get("gemma3.attention.sliding_window_pattern", GEMMA_SWA_PATTERN)
        if isinstance(pattern, list):  # one bool per layer: True slides
            if len(pattern) != n_layers:
                raise CheckpointError(f"{where}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries "
                                      f"for {n_layers} layers")
            types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]
        cap = get("final_logit_softcapping")
        if get("attn_logit_softcapping") is not None:
            raise CheckpointError(f"{where}: gemma3.attn_logit_softcapping is set, which lmstack does not support")
        # llama.cpp: the sliding layers' RoPE base is 10000; attention scale 1/sqrt(head_dim) (27B: hidden/heads)
        gemma = dict(layer_types=types, rope_local_theta=10_000.0, hidden_act="gelu_pytorch_tanh",
                     query_pre_attn_scalar=float(hidden // n_heads if n_layers == 62 else head_dim),
                     final_logit_softcapping=float(cap) if cap is not None else None)
    return ModelConfig(
        **gemma,
        model_type=model_type,
        vocab_size=int(n_vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", required=True)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(get("context_length", 2048)),
        sliding_window=int(sliding) if sliding is not None else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=int(eos) if eos is not None else None,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def expected_shape(cfg: ModelConfig, hf_name: str) -> tuple[int, ...]:
    """The (HF-order) shape a tensor must have for ``cfg``, computed from the config alone."""
    h, d, i, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    nq, nkv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    table = {
        "model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nq, h), "self_attn.k_proj.weight": (nkv, h), "self_attn.v_proj.weight": (nkv, h),
        "self_attn.q_proj.bias": (nq,), "self_attn.k_proj.bias": (nkv,), "self_attn.v_proj.bias": (nkv,),
        "self_attn.o_proj.weight": (h, nq), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,),
    }
    if hf_name in table:
        return table[hf_name]
    m = _HF_LAYER.match(hf_name)
    return table[m.group(2)]


__all__ = [
    "GGUF_ARCH", "SUPPORTED_GGUF_ARCHS", "ROPE_PERMUTED_ARCHS", "gguf_tensor_name", "hf_name_table",
    "is_rope_permuted", "is_norm_shifted", "permute_rope_rows", "unpermute_rope_rows", "rope_heads", "config_to_gguf_kv",
    "config_from_gguf", "expected_shape",
]
