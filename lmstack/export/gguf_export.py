"""``lmstack export --format gguf``: a model directory becomes one GGUF file for llama.cpp, Ollama and LM Studio.

    from lmstack.export import export_gguf
    export_gguf("runs/sft/final", "sft.q8_0.gguf", dtype="q8_0")   # and sft.q8_0.Modelfile beside it
    # ollama create my-model -f sft.q8_0.Modelfile

Written with ``gguf.GGUFWriter`` (the ``gguf`` package; no llama.cpp code is copied). The layout follows the GGUF
spec and what llama.cpp's graphs read: Q/K rows in llama.cpp's interleaved RoPE order for the ``llama``
architecture (:mod:`lmstack.export.gguf_layout`), no ``output.weight`` when embeddings are tied, every 1-D tensor
(norms, biases) in F32, 2-D weights in the chosen type (``f32``, ``f16``, ``q8_0``, ``q4_0``; rows whose length
is not a multiple of the 32-value block stay F16; with ``q4_0`` the embedding and output matrices are Q8_0, as
llama.cpp's quantizer keeps them at higher precision), and the tokenizer as ``gpt2`` BPE metadata with merges,
special ids and the chat template (:mod:`lmstack.export.gguf_tokenizer`). The file is written beside its
destination and renamed into place. References: GGUF spec (ggml ``docs/gguf.md``); Ollama Modelfile reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.errors import CheckpointError, ConfigError
from lmstack.export.gguf_layout import (
    GGUF_ARCH, ROPE_PERMUTED_ARCHS, config_to_gguf_kv, gguf_tensor_name, is_rope_permuted, permute_rope_rows,
    rope_heads,
)
from lmstack.export.gguf_tokenizer import tokenizer_to_gguf
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import read_state_dict
from lmstack.utils.io import atomic_write_text, read_json

GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")
_BLOCK = 32  # values per Q8_0 / Q4_0 block


def _tensor_type(name: str, w: np.ndarray, dtype: str):
    from gguf import GGMLQuantizationType as Q

    if w.ndim == 1 or dtype == "f32":
        return Q.F32
    if dtype == "f16" or w.shape[-1] % _BLOCK:
        return Q.F16
    if dtype == "q8_0" or name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    return Q.Q4_0


def _file_type(dtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[dtype]


def _add_kv(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:  # pragma: no cover - the tables only hold the types above
        raise TypeError(f"{key}: {type(value).__name__}")


def gguf_metadata(model_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, every GGUF key-value the export writes except ``general.*`` file-type keys)."""
    from lmstack.tokenizer import Tokenizer

    src = Path(model_dir)
    cfg = ModelConfig.from_hf(src)
    if cfg.model_type not in GGUF_ARCH:
        raise CheckpointError(f"{src}: GGUF export of {cfg.model_type} is not supported (exportable: "
                              f"{', '.join(GGUF_ARCH)}); {cfg.model_type} imports from GGUF only")
    kv = config_to_gguf_kv(cfg)
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src}: no tokenizer.json; a GGUF file carries its tokenizer, so export needs one")
    tok = Tokenizer.from_dir(src)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)  # what the post-processor adds around a text
    add_bos = len(full) > len(plain) and tok.bos_token_id is not None and full[0] == tok.bos_token_id
    add_eos = len(full) > len(plain) and tok.eos_token_id is not None and full[-1] == tok.eos_token_id
    try:
        kv.update(tokenizer_to_gguf(tj, tok.config, cfg.vocab_size, tok.eos_token_ids, tok.chat_template,
                                    add_bos=add_bos, add_eos=add_eos))
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    return cfg, kv


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, *, dtype: str = "f16",
                name: str | None = None, modelfile: bool = True, adapter: str | os.PathLike | None = None) -> Path:
    """Write ``out_path`` (a ``.gguf`` file) and, with ``modelfile``, an Ollama ``Modelfile`` beside it.
    ``adapter``: a LoRA adapter directory merged into the weights first (:mod:`lmstack.export.adapter`)."""
    from lmstack.export.adapter import merged_source

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(GGUF_DTYPES)}")
    src, out = Path(model_dir), Path(out_path)
    if not src.is_dir():
        raise CheckpointError(f"{src}: model directory not found")
    refuse_quantized(src)
    with merged_source(src, adapter, out) as merged:
        return _export_gguf(merged, out, dtype, name or src.resolve().name, modelfile)


def refuse_quantized(src: Path, hint: str = " (GGUF quantizes on its own: --dtype q8_0 / q4_0)") -> None:
    """Exporters read float weights: a directory ``lmstack quantize`` wrote is refused in one line."""
    cfg = read_json(src / "config.json", error=CheckpointError) if (src / "config.json").is_file() else {}
    if isinstance(cfg, dict) and "quantization_config" in cfg:
        raise CheckpointError(f"{src} holds lmstack-quantized weights; export the float model it came from{hint}")


def _export_gguf(src: Path, out: Path, dtype: str, name: str, modelfile: bool) -> Path:
    import gguf

    cfg, kv = gguf_metadata(src)
    arch = GGUF_ARCH[cfg.model_type]
    sd = read_state_dict(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        writer.add_file_type(int(_file_type(dtype)))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in kv.items():
            _add_kv(writer, key, value)
        for hf_name, t in sd.items():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            gname = gguf_tensor_name(hf_name)
            if gname is None:
                raise CheckpointError(f"{src}: tensor {hf_name} has no GGUF counterpart")
            w = t.detach().to(torch.float32)
            if arch in ROPE_PERMUTED_ARCHS and is_rope_permuted(hf_name):
                w = permute_rope_rows(w, rope_heads(cfg, hf_name))
            arr = np.ascontiguousarray(w.numpy())
            qtype = _tensor_type(gname, arr, dtype)
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gname, arr)
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gname, arr.astype(np.float16))
            else:
                writer.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if modelfile:
        atomic_write_text(out.with_suffix(".Modelfile"), ollama_modelfile(out.name, kv))
    return out


# ---------------------------------------------------------------------------------------------- Ollama
_CHATML_GO = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
    '<|im_start|>assistant\n')
_LLAMA3_GO = (
    '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
    '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
    '<|start_header_id|>assistant<|end_header_id|>\n\n')


def ollama_modelfile(gguf_name: str, kv: dict[str, Any]) -> str:
    """An Ollama ``Modelfile``: ``FROM`` the file, the chat format as a Go ``TEMPLATE`` (ChatML and Llama 3 are
    recognised; otherwise Ollama reads ``tokenizer.chat_template`` from the GGUF), one ``stop`` per end token."""
    tokens = kv["tokenizer.ggml.tokens"]
    jinja = kv.get("tokenizer.chat_template") or ""
    lines = [f"# Ollama: ollama create NAME -f {Path(gguf_name).with_suffix('.Modelfile').name}",
             f"FROM ./{gguf_name}"]
    if "<|im_start|>" in jinja:
        lines.append(f'TEMPLATE """{_CHATML_GO}"""')
    elif "<|start_header_id|>" in jinja:
        lines.append(f'TEMPLATE """{_LLAMA3_GO}"""')
    elif jinja:
        lines.append("# the chat template is read from the GGUF's tokenizer.chat_template")
    stops = [kv.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
    for i in dict.fromkeys(s for s in stops if s is not None):
        lines.append(f'PARAMETER stop "{tokens[i]}"')
    return "\n".join(lines) + "\n"
