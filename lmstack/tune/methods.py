"""Turn a base model directory into what ``fit`` trains, for each method.

=========  ===========================================  ===============================  ==================
method     trains                                       frozen base                      saves
=========  ===========================================  ===============================  ==================
full       every parameter                              -                                model directory
lora       LoRA A/B of the target linears               float weights                    PEFT adapter
qlora      LoRA A/B                                     int8 / NF4 weights (quant/)      PEFT adapter
prompt     P virtual input embeddings                   whole model                      PEFT adapter
prefix     P key/value prefixes in every layer          whole model                      PEFT adapter
=========  ===========================================  ===============================  ==================

Adapters are written with the tokenizer files next to them, so an adapter directory plus its base model
is everything ``lmstack generate --adapter`` and ``lmstack merge`` need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model import copy_tokenizer, load_model
from lmstack.quant.linear import quantize_model
from lmstack.tune.adapters import init_lora_from, save_lora_adapter, save_prompt_adapter
from lmstack.tune.lora import LoraSpec, apply_lora, count_parameters
from lmstack.tune.prompt import PromptEncoder, PromptSpec, PromptTunedModel
from lmstack.utils.device import resolve_device, resolve_dtype


@dataclass
class Prepared:
    model: nn.Module  # what fit trains: the Transformer (full / lora / qlora) or a PromptTunedModel
    base: nn.Module  # the underlying Transformer
    save_fn: Callable[[nn.Module, Path], None] | None  # None: fit's default (a full model directory)
    trainable: int
    total: int

    def describe(self) -> str:
        pct = 100.0 * self.trainable / max(1, self.total)
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({pct:.4f}%)"


def base_dtype(method: str, dtype: str, device: str) -> torch.dtype:
    """Full fine-tuning keeps fp32 master weights; frozen bases may be stored in bf16 on CUDA."""
    dev = resolve_device(device)
    if dtype != "auto":
        return resolve_dtype(dtype, dev)
    if method == "full" or dev.type != "cuda":
        return torch.float32
    return resolve_dtype("auto", dev)


def prepare(model_dir: str | Path, method: str, *, lora: LoraSpec | None = None, quant_method: str = "nf4",
            group_size: int = 64, prompt: PromptSpec | None = None, dtype: str = "auto", device: str = "auto",
            tokenizer_dir: str | Path | None = None, seed: int = 0,
            init_adapter: str | Path | None = None) -> Prepared:
    """Load ``model_dir`` and set it up for ``method`` (see the table in the module docstring)."""
    dev = resolve_device(device)
    dt = base_dtype(method, dtype, device)
    model = load_model(model_dir, device=dev, dtype=dt)
    tok_dir = tokenizer_dir or model_dir
    src = str(model_dir)

    def with_tokenizer(out: Path) -> None:
        copy_tokenizer(tok_dir, out)

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        t, n = count_parameters(model)
        return Prepared(model, model, None, t, n)
    if method in ("lora", "qlora"):
        spec = lora or LoraSpec()
        if method == "qlora":
            quantize_model(model, quant_method, group_size)
        torch.manual_seed(seed)
        apply_lora(model, spec)
        if init_adapter:  # continue a saved adapter instead of starting from B = 0
            init_lora_from(model, init_adapter, spec)

        def save_lora(m: nn.Module, out: Path) -> None:
            save_lora_adapter(m, out, spec, src)
            with_tokenizer(Path(out))

        t, n = count_parameters(model)
        return Prepared(model, model, save_lora, t, n)
    if method in ("prompt", "prefix"):
        enc = PromptEncoder(model, method, prompt or PromptSpec(), seed=seed)
        wrapped = PromptTunedModel(model, enc)

        def save_prompt(m: nn.Module, out: Path) -> None:
            save_prompt_adapter(m.encoder, m.base, out, src)
            with_tokenizer(Path(out))

        t, n = count_parameters(wrapped)
        return Prepared(wrapped, model, save_prompt, t, n)
    raise ConfigError(f"method {method!r} is not supported; supported: full, lora, qlora, prompt, prefix")
