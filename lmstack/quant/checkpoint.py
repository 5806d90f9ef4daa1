"""``lmstack quantize``: a model directory -> a weight-only int8 / int4 model directory, and loading it back.

    from lmstack.quant import quantize_checkpoint, load_quantized
    quantize_checkpoint("runs/sft/final", "runs/sft/int8", method="int8")
    llm = lmstack.load("runs/sft/int8")            # serve / eval / generate load it the same way

The directory keeps the Hugging Face layout (``config.json``, ``model.safetensors``, tokenizer files) with the
quantized layers' tensors (see :mod:`lmstack.quant.packed` for their meaning) and, in ``config.json``::

    "quantization_config": {"quant_method": "lmstack", "method": "int8" | "int4", "group_size": 64,
                            "modules": ["model.layers.0.self_attn.q_proj", ..., "lm_head"],
                            "int8_modules": ["lm_head"]}

``lm_head`` is stored int8 per channel (``lm_head="int8"``, the default; ``int8_modules`` lists it in an int4
checkpoint, as llama.cpp's Q4_0 files keep the output matrix at Q8_0): at batch 1 it is the largest matrix a
small model reads per token (136 M of the 494 M weights of Qwen2.5-0.5B). A tied model is untied for that
(``tie_word_embeddings`` false in the written config): the embedding table stays floating point, read a row at
a time (memory-mapped, so rows never looked up stay on disk). ``lm_head="fp32"`` keeps the float head.
Embeddings and norms stay floating point.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model, read_state_dict, save_model
from lmstack.model.transformer import Transformer
from lmstack.quant.packed import PACKED_METHODS, empty_packed, quantize_linears
from lmstack.utils.device import resolve_device, resolve_dtype
from lmstack.utils.io import atomic_dir, atomic_write_json, read_json

QUANT_METHOD = "lmstack"


def quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The directory's lmstack ``quantization_config``, or None for a float model (or a non-directory)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    qc = read_json(cfg, error=CheckpointError).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"{cfg}: quantization_config quant_method {method!r} is not one lmstack loads "
                              f"(it loads its own {QUANT_METHOD!r} int8/int4 checkpoints); use the float model")
    if qc.get("method") not in PACKED_METHODS or not isinstance(qc.get("modules"), list):
        raise CheckpointError(f"{cfg}: quantization_config needs method in {PACKED_METHODS} and a modules list")
    return qc


CHECKPOINT_METHODS = ("int8", "int4", "gptq", "awq")


def calibration_ids(model_dir: Path, calib: str | os.PathLike, seq_len: int = 512, max_seqs: int = 16) -> torch.Tensor:
    """(n, seq_len) token ids: the calibration text file cut into at most ``max_seqs`` windows of ``seq_len``."""
    from lmstack.tokenizer import Tokenizer

    path = Path(calib)
    if not path.is_file():
        raise CheckpointError(f"{path}: calibration text file not found")
    text = path.read_text(encoding="utf-8", errors="replace")[: 64 * seq_len * max_seqs]  # bytes enough, capped
    ids = Tokenizer.from_dir(model_dir).encode(text)
    n = min(max_seqs, len(ids) // seq_len)
    if n == 0:
        seq_len, n = len(ids), 1
    if seq_len < 64:
        raise CheckpointError(f"{path}: {len(ids)} tokens is too little calibration text (give at least a few pages)")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


LM_HEAD_CHOICES = ("int8", "fp32")


def quantize_transformer(model: Transformer, method: str, group_size: int, calib_ids: torch.Tensor | None = None,
                         lm_head: str = "int8", awq_clip: bool = True) -> tuple[list[str], list[str]]:
    """Quantize a float ``model`` in place as :func:`quantize_checkpoint` does (``calib_ids`` for gptq / awq);
    returns (quantized module names, those stored int8 in an int4 model: ``lm_head``)."""
    if method == "gptq":
        from lmstack.quant.gptq import gptq_quantize_model

        modules = gptq_quantize_model(model, calib_ids, group_size)
    elif method == "awq":
        from lmstack.quant.awq import awq_quantize_model

        modules = awq_quantize_model(model, calib_ids, group_size, clip=awq_clip)
    else:
        modules = quantize_linears(model, method, group_size)
    int8_modules = []
    if lm_head == "int8" and type(model.lm_head) is nn.Linear:
        from lmstack.quant.packed import Int8PackedLinear

        head = model.lm_head
        if model.config.tie_word_embeddings:  # the float table stays the embedding; the head becomes its own
            model.config.tie_word_embeddings = False
        model.lm_head = Int8PackedLinear.from_linear(head)
        modules, int8_modules = modules + ["lm_head"], ["lm_head"]
    return modules, int8_modules


def quantize_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, method: str = "int8",
                        group_size: int = 64, calib: str | os.PathLike | None = None,
                        lm_head: str = "int8", awq_clip: bool = True) -> Path:
    """Quantize every linear layer of ``model_dir`` (but ``lm_head``) and write the result to ``out_dir``.

    ``method``: ``int8`` (per channel), ``int4`` (group-wise, round to nearest), ``gptq`` or ``awq`` (the same int4
    format, calibrated on the text file ``calib``: :mod:`lmstack.quant.gptq`, :mod:`lmstack.quant.awq`).
    ``lm_head``: ``int8`` (per channel, whatever ``method``) or ``fp32``. ``awq_clip``: AWQ's weight-clipping search
    after scaling (on by default)."""
    src, out = Path(model_dir), Path(out_dir)
    if lm_head not in LM_HEAD_CHOICES:
        raise ConfigError(f"--lm-head {lm_head!r} is not supported; choose one of {', '.join(LM_HEAD_CHOICES)}")
    if method not in CHECKPOINT_METHODS:
        raise ConfigError(f"--method {method!r} is not supported; supported: {', '.join(CHECKPOINT_METHODS)}")
    if method in ("gptq", "awq") and calib is None:
        raise ConfigError(f"--method {method} needs --calib FILE (a text file of the kind of text the model will see)")
    if quantization_config(src) is not None:
        raise CheckpointError(f"{src} is already quantized; quantize the float model it came from")
    model = load_model(src, device="cpu", dtype="float32")
    modules, int8_modules = quantize_transformer(
        model, method, group_size, calibration_ids(src, calib) if method in ("gptq", "awq") else None, lm_head,
        awq_clip)
    with atomic_dir(out) as tmp:
        save_model(model, tmp, tokenizer_dir=src)
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
        hf = model.config.to_hf()
        hf["torch_dtype"] = "float32"
        stored = "int8" if method == "int8" else "int4"  # gptq and awq write the int4 format
        hf["quantization_config"] = {"quant_method": QUANT_METHOD, "method": stored,
                                     "group_size": group_size if stored == "int4" else None, "modules": modules,
                                     "calibration": method if method in ("gptq", "awq") else "rtn"}
        if method == "awq":
            hf["quantization_config"]["awq_clip"] = awq_clip
        if int8_modules and stored != "int8":
            hf["quantization_config"]["int8_modules"] = int8_modules
        atomic_write_json(tmp / "config.json", hf)
    return out


def load_quantized(path: str | os.PathLike, *, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None) -> Transformer:
    """Load a directory written by :func:`quantize_checkpoint` (packed layers + float rest), in eval mode."""
    path = Path(path)
    qc = quantization_config(path)
    if qc is None:
        raise CheckpointError(f"{path}: not an lmstack-quantized model directory (no quantization_config)")
    hf = read_json(path / "config.json", error=CheckpointError)
    hf.pop("quantization_config")
    cfg = ModelConfig.from_hf(hf)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype if dtype is not None else "auto", dev)
    sd = read_state_dict(path)
    int8_modules = qc.get("int8_modules") or []
    if not isinstance(int8_modules, list) or not set(int8_modules) <= set(qc["modules"]):
        raise CheckpointError(f"{path}: quantization_config int8_modules must list some of its modules")
    with torch.device("meta"):
        model = Transformer(cfg)
        for name in qc["modules"]:
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"{path}: quantization_config names module {name!r}, which the model "
                                      "does not have") from None
            if type(lin) is not nn.Linear:
                raise CheckpointError(f"{path}: quantization_config names {name!r}, which is not a linear layer")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    empty_packed((lin.in_features, lin.out_features, lin.bias is not None),
                                 "int8" if name in int8_modules else qc["method"], qc.get("group_size") or 64, dt))
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in sd and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        k = (missing or unexpected)[0]
        raise CheckpointError(f"{path}: weights do not match the quantization_config ({'missing' if missing else 'unexpected'} "
                              f"tensor {k}); quantize the float model again")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape) or t.dtype.is_floating_point != expected[k].dtype.is_floating_point \
                or (not t.dtype.is_floating_point and t.dtype != expected[k].dtype):
            raise CheckpointError(f"{path}: tensor {k} is {t.dtype} {tuple(t.shape)}, expected "
                                  f"{expected[k].dtype} {tuple(expected[k].shape)}")
        is_param_float = t.is_floating_point() and not k.endswith(("weight_scale", "weight_zero"))
        sd[k] = t.to(device=dev, dtype=dt) if is_param_float else t.to(dev)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    model.tie_weights()
    model.config.torch_dtype = str(dt).removeprefix("torch.")
    model.config.extra["quantization_config"] = json.loads(json.dumps(qc))
    return model.eval()


def load_any(path: str | os.PathLike, *, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> Transformer:
    """A float model directory through :func:`lmstack.model.load_model`, a quantized one through
    :func:`load_quantized`: the one call serve / eval / generate make."""
    if quantization_config(path) is not None:
        return load_quantized(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype)
