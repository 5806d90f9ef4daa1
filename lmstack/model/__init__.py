"""Model core: ModelConfig + presets, the one Transformer class (dense and MoE decoders), attention contexts,
HF checkpoint I/O, and the BERT-style Encoder (masked LM, classification)."""

from lmstack.model.attention import AttentionContext, CausalContext, KVCache, build_mask, sdpa
from lmstack.model.config import PRESETS, SUPPORTED_MODEL_TYPES, ModelConfig, preset
from lmstack.model.encoder import Encoder, EncoderConfig, load_encoder, save_encoder
from lmstack.model.hf_io import build_model, copy_tokenizer, load_model, read_state_dict, save_model
from lmstack.model.transformer import Transformer

__all__ = [
    "AttentionContext", "CausalContext", "KVCache", "build_mask", "sdpa",
    "PRESETS", "SUPPORTED_MODEL_TYPES", "ModelConfig", "preset",
    "build_model", "copy_tokenizer", "load_model", "read_state_dict", "save_model", "Transformer",
    "Encoder", "EncoderConfig", "load_encoder", "save_encoder",
]
