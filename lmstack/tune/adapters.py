"""Adapter directories (PEFT layout) and the one function the serving engine calls.

Contract for ``lmstack generate --adapter DIR`` (the serving engine)::

    from lmstack.tune.adapters import load_adapter
    rt = load_adapter(model, adapter_dir)      # model: lmstack Transformer, already on its device/dtype

* LoRA (``peft_type: LORA``): the target linears of ``model`` are swapped **in place** for
  ``LoRALinear`` modules (base + B·A·scaling); ``rt.prefix_kv is None``; the engine needs nothing else.
  (Call :func:`lmstack.tune.lora.merge_lora` afterwards to fold them into plain linears for speed.)
* Prompt tuning (``PROMPT_TUNING``) and prefix tuning (``PREFIX_TUNING``): ``model`` is not modified;
  ``rt.prefix_kv`` is ``list[tuple[Tensor, Tensor]]``, one ``(k, v)`` per layer, each
  ``(n_kv_heads, P, head_dim)`` on the model's device and dtype, keys already including RoPE where
  applicable. Meaning: *every sequence starts with these P virtual key/value slots, always visible to every
  query, and its real tokens take positions P, P+1, ...* (so RoPE for token i uses position P + i).
  For prompt tuning these are the learned virtual-token embeddings run once through the model at positions
  0..P-1 (a causal prefix's k/v do not depend on what follows). Prefix keys are used as stored (PEFT).
  :class:`lmstack.tune.prompt.PrefixContext` is a reference implementation of this attention.

On disk (loadable by ``peft.PeftModel.from_pretrained`` on the matching ``transformers`` model):
``adapter_config.json`` (PEFT fields) + ``adapter_model.safetensors``: LoRA keys
``base_model.model.{module}.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r); prompt and prefix tuning
one tensor ``prompt_embeddings`` ((P, hidden) or (P, n_layers * 2 * n_kv_heads * head_dim)).

Base check: adapters lmstack saves carry a fingerprint of their base (:mod:`lmstack.tune.fingerprint`);
applying one to another base raises :class:`CheckpointError` unless ``allow_base_mismatch=True`` (or
``LMSTACK_ALLOW_BASE_MISMATCH=1``), which applies it with a warning. LoRA targets, ranks and alphas follow
PEFT's rules, patterns and layer subsets included (:mod:`lmstack.tune.peft_targets`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmstack.errors import CheckpointError
from lmstack.model.transformer import Transformer
from lmstack.tune import fingerprint as FP
from lmstack.tune.lora import LoraSpec, apply_lora_plan, lora_modules, lora_state_dict
from lmstack.tune.peft_targets import lora_targets
from lmstack.tune.prompt import PromptEncoder, PromptSpec
from lmstack.utils.io import atomic_write_json, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
PEFT_TYPES = {"lora": "LORA", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
ALLOW_MISMATCH_ENV = "LMSTACK_ALLOW_BASE_MISMATCH"


@dataclass
class AdapterRuntime:
    method: str  # "lora" | "prompt" | "prefix"
    config: dict[str, Any]
    prefix_kv: list[tuple[Tensor, Tensor]] | None = None
    wrapped_modules: list[str] = field(default_factory=list)

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv[0][0].shape[-2]


def _write_weights(tensors: dict[str, Tensor], path: Path, base: nn.Module | None = None) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    meta = {"format": "pt"}
    if base is not None:
        meta[FP.KEY] = FP.encode(FP.base_fingerprint(base))
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def save_lora_adapter(model: nn.Module, out_dir: str | Path, spec: LoraSpec,
                      base_model_name_or_path: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict(model)
    if not sd:
        raise CheckpointError("the model has no LoRA modules to save")
    leaves = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_modules(model)})
    cfg = {
        # an encoder's adapter (BERT / ModernBERT) is a plain PeftModel: peft's causal-LM wrapper wants generate()
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if hasattr(model, "lm_head") else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "target_modules": leaves, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
    }
    if spec.layers_to_transform is not None:  # PEFT applies the adapter to these decoder layers only
        from lmstack.tune.lora import layer_ids

        cfg.update(layers_to_transform=layer_ids(model, spec.layers_to_transform), layers_pattern="layers")
    _write_weights({_PREFIX + k: v for k, v in sd.items()}, out / ADAPTER_WEIGHTS, base=model)
    atomic_write_json(out / ADAPTER_CONFIG, cfg)
    return out


def save_prompt_adapter(encoder: PromptEncoder, model: Transformer, out_dir: str | Path,
                        base_model_name_or_path: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    cfg: dict[str, Any] = {
        "peft_type": PEFT_TYPES[encoder.method], "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "num_virtual_tokens": encoder.P,
        "num_layers": c.num_hidden_layers, "num_transformer_submodules": 1, "inference_mode": True,
    }
    if encoder.method == "prompt":
        cfg.update(token_dim=c.hidden_size, num_attention_heads=c.num_attention_heads,
                   prompt_tuning_init="RANDOM")
    else:  # PEFT stores GQA prefixes with the kv-head count (peft#1901)
        cfg.update(token_dim=c.num_key_value_heads * c.head_dim, num_attention_heads=c.num_key_value_heads,
                   prefix_projection=False, encoder_hidden_size=c.hidden_size)
    _write_weights({"prompt_embeddings": encoder.prompt_embeddings}, out / ADAPTER_WEIGHTS, base=model)
    atomic_write_json(out / ADAPTER_CONFIG, cfg)
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(method, adapter_config, tensors) with clear errors for a missing or foreign adapter."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_CONFIG} (is this an adapter directory?)")
    cfg = read_json(cfg_path, error=CheckpointError)
    peft_type = cfg.get("peft_type")
    methods = {v: k for k, v in PEFT_TYPES.items()}
    if peft_type not in methods:
        raise CheckpointError(f"{cfg_path}: peft_type {peft_type!r} is not supported; "
                              f"supported: {', '.join(methods)}")
    if not w_path.is_file():
        raise CheckpointError(f"{d}: {ADAPTER_WEIGHTS} not found")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{w_path}: cannot read safetensors file ({e})") from None
    return methods[peft_type], cfg, tensors


def _check_shape(name: str, got: Tensor, want: tuple[int, ...], where: Path) -> None:
    if tuple(got.shape) != tuple(want):
        raise CheckpointError(f"{where}: tensor {name} has shape {tuple(got.shape)} but this model needs "
                              f"{tuple(want)} (was the adapter trained on a different base model?)")


def check_base(model: Transformer, adapter_dir: str | Path, allow_base_mismatch: bool = False) -> str | None:
    """Compare the adapter's recorded base fingerprint with ``model``: None when it matches or none was
    recorded; the reason when it does not and the mismatch is allowed; :class:`CheckpointError` otherwise."""
    w = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(w), framework="pt") as f:
            saved = FP.decode((f.metadata() or {}).get(FP.KEY))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{w}: cannot read safetensors file ({e})") from None
    if saved is None:
        return None
    why = FP.mismatch(saved, model)
    if why is None:
        return None
    if allow_base_mismatch or os.environ.get(ALLOW_MISMATCH_ENV) == "1":
        warnings.warn(f"{adapter_dir}: applied to a base it was not trained on ({why})", stacklevel=3)
        return why
    raise CheckpointError(f"{adapter_dir}: trained on a different base model ({why}); apply it to its base, or "
                          f"pass --allow-base-mismatch ({ALLOW_MISMATCH_ENV}=1) to apply it anyway")


def _same_weight(saved: Tensor, p: Tensor) -> bool:
    if tuple(saved.shape) != tuple(p.shape):
        return False
    a, b = saved.float(), p.detach().float().cpu()
    return bool(torch.allclose(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()) + 1e-6))


def load_adapter(model: Transformer, adapter_dir: str | Path, allow_base_mismatch: bool = False) -> AdapterRuntime:
    """Attach an adapter to ``model`` (see the module docstring for the exact contract)."""
    d = Path(adapter_dir)
    method, cfg, tensors = read_adapter(d)
    check_base(model, d, allow_base_mismatch)
    dev, dt = model.device, model.dtype
    if method == "lora":
        plan = lora_targets(model, cfg, d / ADAPTER_CONFIG)
        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        wrapped = apply_lora_plan(model, plan, 0.0, bool(cfg.get("use_rslora", False)))
        for n, p in model.named_parameters():  # apply_lora freezes everything; restore the caller's flags
            base_name = n.replace(".base_layer.", ".")
            if base_name in requires:
                p.requires_grad_(requires[base_name])
        own = lora_state_dict(model)
        for k, p in own.items():
            key = _PREFIX + k
            if key not in tensors:
                raise CheckpointError(f"{d / ADAPTER_WEIGHTS}: missing tensor {key}")
            _check_shape(key, tensors[key], tuple(p.shape), d)
            with torch.no_grad():
                p.copy_(tensors[key].to(p.dtype))
        params = dict(model.named_parameters())
        extra = []
        for k in tensors:
            name = k.removeprefix(_PREFIX)
            if name in own:
                continue
            if ".base_layer." in name and name in params:  # peft's save_embedding_layers copy of a base weight
                if _same_weight(tensors[k], params[name]):
                    continue
                raise CheckpointError(f"{d / ADAPTER_WEIGHTS}: stores its own {name} that differs from this base's "
                                      "(a resized vocabulary or another base); lmstack does not replace base weights "
                                      "from an adapter: merge it with peft and load the merged model")
            extra.append(k)
        if extra:
            raise CheckpointError(f"{d / ADAPTER_WEIGHTS}: tensor {extra[0]} matches no LoRA module of this model")
        return AdapterRuntime("lora", cfg, None, wrapped)
    c = model.config
    P = int(cfg["num_virtual_tokens"])
    enc = PromptEncoder.__new__(PromptEncoder)
    nn.Module.__init__(enc)
    enc.method, enc.P = method, P
    enc.n_layers, enc.n_kv, enc.head_dim = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    emb = tensors.get("prompt_embeddings")
    if emb is None:
        raise CheckpointError(f"{d / ADAPTER_WEIGHTS}: missing tensor prompt_embeddings")
    width = c.hidden_size if method == "prompt" else c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim
    _check_shape("prompt_embeddings", emb, (P, width), d)
    enc.prompt_embeddings = nn.Parameter(emb.to(dev, dt), requires_grad=False)
    with torch.no_grad():
        kv = [(k.contiguous(), v.contiguous()) for k, v in enc.prefix_kv(model)]
    return AdapterRuntime(method, cfg, kv)


def init_lora_from(model: Transformer, adapter_dir: str | Path, spec: LoraSpec) -> int:
    """Continue training a saved LoRA adapter: copy its A/B matrices into ``model``'s freshly applied LoRA modules
    (the ones ``spec`` made). The adapter must adapt exactly those modules with the same rank and scaling, and must
    have been trained on this base; returns the number of tensors copied."""
    d = Path(adapter_dir)
    method, cfg, tensors = read_adapter(d)
    if method != "lora":
        raise CheckpointError(f"{d}: is a {method} adapter; lora.init_from needs a LoRA adapter")
    check_base(model, d)
    want = {"r": spec.r, "lora_alpha": spec.alpha, "use_rslora": spec.use_rslora}
    for k, v in want.items():
        got = cfg.get(k, False if k == "use_rslora" else None)
        if got != v and not (isinstance(got, (int, float)) and isinstance(v, (int, float)) and float(got) == float(v)):
            raise CheckpointError(f"{d}: the adapter has {k}={got!r} but the lora section says {v!r}; make the "
                                  "lora section match the adapter it continues")
    own = lora_state_dict(model)
    saved = {k.removeprefix(_PREFIX): t for k, t in tensors.items()}
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        which = f"it lacks {missing[0]}" if missing else f"it has {extra[0]}, which the lora section does not adapt"
        raise CheckpointError(f"{d}: adapts other modules than the lora section ({which}); give lora.target_modules "
                              "and lora.layers_to_transform as the adapter was trained")
    with torch.no_grad():
        for k, p in own.items():
            _check_shape(k, saved[k], tuple(p.shape), d)
            p.copy_(saved[k].to(p.dtype))
    return len(own)


def load_prompt_encoder(model: Transformer, adapter_dir: str | Path) -> PromptEncoder:
    """A trainable :class:`PromptEncoder` initialised from a saved prompt/prefix adapter (resume, eval)."""
    method, cfg, tensors = read_adapter(adapter_dir)
    if method == "lora":
        raise CheckpointError(f"{adapter_dir}: is a LoRA adapter, not prompt or prefix tuning")
    enc = PromptEncoder(model, method, PromptSpec(int(cfg["num_virtual_tokens"]), init="random"))
    emb = tensors["prompt_embeddings"]
    _check_shape("prompt_embeddings", emb, tuple(enc.prompt_embeddings.shape), Path(adapter_dir))
    with torch.no_grad():
        enc.prompt_embeddings.copy_(emb)
    return enc
