"""``lmstack merge``: fold a LoRA adapter into its base model and write a plain model directory.

``W' = W + B·A·scaling`` per adapted linear (Hu et al. 2021, §4.1: no inference latency after merging).
The result has the same logits as base + adapter and loads anywhere a Hugging Face model loads.
Prompt / prefix adapters are not weights of the model and cannot be merged.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.errors import CheckpointError
from lmstack.model import load_model, save_model
from lmstack.model.hf_io import TOKENIZER_FILES
from lmstack.tune.adapters import load_adapter, read_adapter
from lmstack.tune.lora import merge_lora
from lmstack.utils.io import atomic_dir


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: str | None = None, allow_base_mismatch: bool = False) -> Path:
    """Write ``out_dir`` (atomically): base weights with the LoRA update folded in, config, tokenizer."""
    method, _, _ = read_adapter(adapter_dir)
    if method != "lora":
        raise CheckpointError(f"{adapter_dir} is a {method}-tuning adapter; only LoRA adapters can be merged "
                              "into the weights (serve it with `lmstack generate --adapter`)")
    model = load_model(model_dir, device="cpu", dtype=dtype)
    load_adapter(model, adapter_dir, allow_base_mismatch=allow_base_mismatch)
    merge_lora(model)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        # a LoRA on lm_head of a tied model: the merged head is no longer the embedding table, so the merged
        # model is untied (saving it tied would silently drop the head's update)
        model.config.tie_word_embeddings = False
    adapter_has_tok = any((Path(adapter_dir) / f).is_file() for f in TOKENIZER_FILES)
    tok_src = adapter_dir if adapter_has_tok else model_dir
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_model(model, tmp, tokenizer_dir=tok_src)
    return out
