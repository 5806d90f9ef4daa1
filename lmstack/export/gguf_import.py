"""``lmstack import --gguf FILE --out DIR``: a GGUF file (llama.cpp, Ollama, LM Studio) becomes a model directory.

    from lmstack.export import import_gguf
    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")     # config.json, model.safetensors, tokenizer...
    llm = lmstack.load("smollm2")                                  # or lmstack.load("model.gguf") directly

Every tensor is dequantized with the ``gguf`` package (``gguf.quants.dequantize``: F32/F16/BF16, Q4_0...Q8_0,
K-quants, IQ types), llama.cpp's interleaved RoPE row order of Q/K is undone for the ``llama`` architecture
(:mod:`lmstack.export.gguf_layout`), and the tokenizer is rebuilt from its GGUF metadata
(:mod:`lmstack.export.gguf_tokenizer`). The directory is written beside its destination and renamed into place:
a bad file leaves nothing behind. References: the GGUF spec (ggml ``docs/gguf.md``); ``transformers``'
GGUF loader is the independent reference the tests compare against.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lmstack.errors import CheckpointError
from lmstack.export.gguf_file import read_gguf
from lmstack.export.gguf_layout import (
    ROPE_PERMUTED_ARCHS, config_from_gguf, expected_shape, hf_name_table, is_norm_shifted, is_rope_permuted, rope_heads,
    unpermute_rope_rows,
)
from lmstack.export.gguf_tokenizer import tokenizer_from_gguf
from lmstack.utils.io import atomic_dir, atomic_write_json, atomic_write_text, file_sha256

_DTYPES = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}


def _dequantize(t, where: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        if t.qtype == GGMLQuantizationType.BF16 and t.data.dtype != np.uint8:
            arr = dequantize(t.data.view(np.uint8), t.qtype)
        else:
            arr = dequantize(t.data, t.qtype)
    except NotImplementedError:
        raise CheckpointError(f"{where}: tensor {t.name} has type {t.type_name}, which the gguf package cannot "
                              "dequantize; re-quantize the model to a common type (Q4_K_M, Q8_0, F16)") from None
    if arr.size != int(np.prod(t.shape)):
        raise CheckpointError(f"{where}: tensor {t.name} holds {arr.size} values, its shape {t.shape} needs "
                              f"{int(np.prod(t.shape))}; the file is corrupt")
    return arr.reshape(t.shape)


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Convert ``gguf_path`` into a Hugging Face-layout model directory at ``out_dir`` (replaced if it exists)."""
    from safetensors.torch import save_file

    src, out = Path(gguf_path), Path(out_dir)
    if dtype not in _DTYPES:
        raise CheckpointError(f"import dtype {dtype!r} is not supported; choose one of float32, bfloat16, float16")
    g = read_gguf(src)
    where = str(src)
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import _type_traits as dequantizable

    for t in g.tensors.values():  # refuse an unusable type before any work (I8/I32 tensors, Q8_K, ...)
        if t.qtype not in (Q.F32, Q.F16) and t.qtype not in dequantizable:
            raise CheckpointError(f"{where}: tensor {t.name} has type {t.type_name}, which lmstack cannot dequantize; "
                                  "re-quantize the model to a common type (Q4_K_M, Q8_0, F16)")
    cfg = config_from_gguf(g.meta, set(g.tensors), where)
    tokenizer_json, tokenizer_config, stops = tokenizer_from_gguf(g.meta, where)
    arch = g.meta["general.architecture"]
    names = hf_name_table(cfg.num_hidden_layers, arch)
    unknown = [n for n in g.tensors if n not in names]
    if unknown:
        raise CheckpointError(f"{where}: tensor {unknown[0]} (and {len(unknown) - 1} more) has no place in a "
                              f"{cfg.model_type} model; is general.architecture right?")
    permuted = g.meta["general.architecture"] in ROPE_PERMUTED_ARCHS
    state: dict[str, torch.Tensor] = {}
    for gname, t in g.tensors.items():
        hf = names[gname]
        want = expected_shape(cfg, hf)
        if t.shape != want:
            raise CheckpointError(f"{where}: tensor {gname} has shape {t.shape} but the metadata implies {want}")
        w = torch.from_numpy(np.array(_dequantize(t, where), dtype=np.float32, order="C"))  # a copy: the file stays read-only
        if permuted and is_rope_permuted(hf):
            w = unpermute_rope_rows(w, rope_heads(cfg, hf)).contiguous()
        if is_norm_shifted(arch, hf):
            w = w - 1.0
        state[hf] = w.to(_DTYPES[dtype])
    required = [k for k in names.values() if not k.endswith(".bias") and "q_norm" not in k and "k_norm" not in k
                and k != "lm_head.weight"]
    if cfg.qk_norm:
        required += [k for k in names.values() if k.endswith(("q_norm.weight", "k_norm.weight"))]
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{where}: the file lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"{next(g for g, h in names.items() if h == missing[0])}; the file is incomplete")
    cfg.torch_dtype = str(_DTYPES[dtype]).removeprefix("torch.")
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        hf_cfg = cfg.to_hf()
        hf_cfg["eos_token_id"] = stops[0] if len(stops) == 1 else (stops or cfg.eos_token_id)
        atomic_write_json(tmp / "config.json", hf_cfg)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": stops if len(stops) > 1 else cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id, "do_sample": False}
        atomic_write_json(tmp / "generation_config.json", gen)
        atomic_write_text(tmp / "tokenizer.json", tokenizer_json)
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config)
        atomic_write_json(tmp / "gguf_source.json", {
            "file": src.name, "architecture": g.meta.get("general.architecture"), "name": g.meta.get("general.name"),
            "tensor_types": sorted({t.type_name for t in g.tensors.values()})})
    return out


def gguf_cache_dir() -> Path:
    """Where ``--model FILE.gguf`` imports go: ``$LMSTACK_CACHE/gguf`` (default ``~/.cache/lmstack/gguf``)."""
    root = os.environ.get("LMSTACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmstack")
    return Path(root) / "gguf"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model directory as it is; a ``.gguf`` file imported once into a cache directory keyed by its sha256."""
    p = Path(path)
    if not (p.suffix.lower() == ".gguf" and p.is_file()):
        return p
    digest = file_sha256(p)[:20]
    dest = gguf_cache_dir() / f"{p.stem}-{digest}"
    if not (dest / "config.json").is_file():
        import_gguf(p, dest)
    return dest
