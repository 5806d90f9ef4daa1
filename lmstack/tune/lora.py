"""LoRA as a module swap (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

``y = base(x) + B(A(dropout(x))) * scaling`` with ``A`` (r, in) Kaiming-uniform, ``B`` (out, r) zero, so a
fresh adapter returns exactly the base output. ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski 2023). The base layer may be an ``nn.Linear`` or a frozen quantized linear (QLoRA).

Names follow PEFT so the adapter file is a key rename away from ``adapter_model.safetensors``:
``...q_proj.base_layer.weight``, ``...q_proj.lora_A.weight`` (r, in), ``...q_proj.lora_B.weight`` (out, r).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import ConfigError
from lmstack.quant.linear import QuantLinear


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False
    layers_to_transform: list[int] | None = None  # decoder layer ids; negative: counted from the top

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        ref = next(iter(base_layer.buffers()), None) if isinstance(base_layer, QuantLinear) else base_layer.weight
        dev = ref.device if ref is not None else None
        dt = torch.float32  # adapters train in fp32 even over a bf16 / quantized base (PEFT's default)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dt)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:  # x (..., in) -> (..., out)
        y = self.base_layer(x)
        if self.disabled:
            return y
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> Tensor:  # (out, in)
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + B A * scaling`` (a quantized base is dequantized first)."""
        base = self.base_layer
        w = base.dequantize(torch.float32) if isinstance(base, QuantLinear) else base.weight.data.float()
        out_dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        lin = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=w.device, dtype=out_dtype)
        with torch.no_grad():
            lin.weight.copy_((w + self.delta_weight().to(w.device)).to(out_dtype))
            if base.bias is not None:
                lin.bias.copy_(base.bias.data)
        return lin

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QuantLinear)) and not isinstance(m, LoRALinear)


def resolve_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Full module names to wrap. ``"all-linear"`` means every linear inside the decoder layers (not
    ``lm_head``), as PEFT; otherwise a name matches when its last component(s) equal an entry."""
    names = [n for n, m in model.named_modules() if _is_linear(m) and ".lora_" not in n]
    if target_modules == "all-linear" or target_modules == ["all-linear"]:
        chosen = [n for n in names if not n.endswith("lm_head")]
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
        unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(f"lora.target_modules: no linear layer named {unknown[0]!r}; "
                              f"available: {', '.join(leaves)} or all-linear")
    if not chosen:
        raise ConfigError("lora.target_modules matched no linear layer")
    return chosen


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_ids(model: nn.Module, layers: list[int]) -> list[int]:
    """``layers`` (negative ids counted from the top) as sorted ids of ``model``'s decoder layers."""
    n = len({int(m.group(1)) for name, _ in model.named_modules() if (m := _LAYER.search(name))})
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ConfigError(f"lora.layers_to_transform: layer {bad[0]} does not exist; the model has {n} layers "
                          f"(0 ... {n - 1}, or -{n} ... -1 from the top)")
    return sorted({i % n for i in layers})


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Freeze every parameter, wrap the target linears in :class:`LoRALinear` (only A, B train); with
    ``spec.layers_to_transform``, only those of the listed decoder layers.

    Returns the wrapped module names."""
    targets = resolve_targets(model, spec.target_modules)
    if spec.layers_to_transform is not None:
        keep = set(layer_ids(model, spec.layers_to_transform))
        targets = [t for t in targets if (m := _LAYER.search(t)) and int(m.group(1)) in keep]
        if not targets:
            raise ConfigError("lora.layers_to_transform: no target module lies in the listed layers")
    return apply_lora_plan(model, {n: (spec.r, spec.alpha) for n in targets}, spec.dropout, spec.use_rslora)


def apply_lora_plan(model: nn.Module, plan: dict[str, tuple[int, float]], dropout: float = 0.0,
                    use_rslora: bool = False) -> list[str]:
    """Freeze every parameter and wrap each named linear with its own ``(r, alpha)`` (PEFT's
    ``rank_pattern`` / ``alpha_pattern``). Returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (r, alpha) in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora))
    return list(plan)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors: ``{module}.lora_A.weight`` / ``{module}.lora_B.weight``."""
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
    return out


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` by a plain linear holding the merged weight; returns the count."""
    found = list(lora_modules(model))
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.merged())
    return len(found)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (adapters bypassed): the free reference model of LoRA-DPO."""
    mods = [m for _, m in lora_modules(model)]
    for m in mods:
        m.disabled = True
    try:
        yield
    finally:
        for m in mods:
            m.disabled = False


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; quantized weights count as their logical element count."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features
    return trainable, total
