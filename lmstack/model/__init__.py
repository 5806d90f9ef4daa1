"""Model core: ModelConfig + presets, the one Transformer class, attention contexts, HF checkpoint I/O."""

from lmstack.model.attention import AttentionContext, CausalContext, KVCache, build_mask, sdpa
from lmstack.model.config import PRESETS, SUPPORTED_MODEL_TYPES, ModelConfig, preset
from lmstack.model.hf_io import build_model, copy_tokenizer, load_model, read_state_dict, save_model
from lmstack.model.transformer import Transformer

__all__ = [
    "AttentionContext", "CausalContext", "KVCache", "build_mask", "sdpa",
    "PRESETS", "SUPPORTED_MODEL_TYPES", "ModelConfig", "preset",
    "build_model", "copy_tokenizer", "load_model", "read_state_dict", "save_model", "Transformer",
]
