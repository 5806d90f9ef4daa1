"""``lmstack export --format onnx``: a decoder as one ONNX graph with a KV-cache interface, for onnxruntime.

    from lmstack.export.onnx_export import export_onnx
    export_onnx("runs/sft/final", "sft-onnx", dtype="f32")     # sft-onnx/model.onnx + config + tokenizer
    # generate: lmstack.export.onnx_runtime.OnnxCausalLM("sft-onnx").generate([[1, 2, 3]], 16)

The graph's interface is the one Hugging Face optimum and onnxruntime-genai use for decoder-only models::

    inputs   input_ids                 int64 (batch, sequence_length)
             attention_mask            int64 (batch, total_sequence_length)   1 = token, 0 = padding
             position_ids              int64 (batch, sequence_length)
             past_key_values.N.key     (batch, num_key_value_heads, past_sequence_length, head_dim)
             past_key_values.N.value   (same)
    outputs  logits                    (batch, sequence_length, vocab_size)
             present.N.key / .value    (batch, num_key_value_heads, total_sequence_length, head_dim)

with ``total_sequence_length = past_sequence_length + sequence_length``; keys are stored after RoPE, as in
transformers' cache. Prefill passes an empty past (length 0); each decode step feeds the previous ``present``
back as ``past``. The attention is lmstack's own (:class:`PastKVContext`, an ``AttentionContext`` like the KV
cache, so the model code is the one lmstack trains and serves): a query at cache index i sees key j iff j <= i,
the key is not padding and, with a sliding window W, i - j < W.

Traced with ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript), opset 18. ``f16`` traces the model
in float16 (RMSNorm statistics and RoPE angles stay float32, as in lmstack). ``int8`` / ``int4`` write lmstack's
quantized weights as onnxruntime ``MatMulNBits`` nodes (:mod:`lmstack.export.onnx_quant`). Files larger than
``EXTERNAL_DATA_BYTES`` keep their weights in ``model.onnx.data`` beside the graph (protobuf's 2 GiB limit).
The directory is written beside its destination and renamed into place.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.attention import build_mask, sdpa
from lmstack.model.transformer import Transformer
from lmstack.utils.io import atomic_dir, atomic_write_json

ONNX_DTYPES = ("f32", "f16")
_TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16}
OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to model.onnx.data (protobuf refuses messages > 2 GiB)
MODEL_FILE = "model.onnx"


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


class PastKVContext:
    """Attention over ``past`` (B, KV, P, D) per layer followed by this call's keys and values (B, KV, T, D).

    ``attention_mask`` (B, P + T) marks real tokens; ``present`` collects each layer's concatenated (k, v)
    in layer order (the graph's ``present.N.*`` outputs)."""

    def __init__(self, past: tuple[Tensor, ...], attention_mask: Tensor, sliding_window: int | None):
        self.past = past
        self.attention_mask = attention_mask
        self.sliding_window = sliding_window
        self.present: list[Tensor] = []
        self._mask: Tensor | None = None

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k = torch.cat([self.past[2 * layer_idx], k], 2)  # (B, KV, P + T, D)
        v = torch.cat([self.past[2 * layer_idx + 1], v], 2)
        self.present += [k, v]
        if self._mask is None:  # built once, shared by all layers: (B, 1, T, P + T)
            S, T = k.shape[2], q.shape[2]
            k_idx = torch.arange(S, device=q.device)
            self._mask = build_mask(k_idx[S - T:], k_idx, self.attention_mask, self.sliding_window)
        return sdpa(q, k, v, self._mask)


class OnnxDecoder(nn.Module):
    """The traced module: (input_ids, attention_mask, position_ids, past) -> (logits, *present)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        ctx = PastKVContext(past, attention_mask, self.model.config.sliding_window)
        logits = self.model(input_ids, position_ids=position_ids, ctx=ctx)
        return (logits, *ctx.present)


def check_exportable(model: Transformer) -> None:
    """Refuse, in one line, what the traced graph cannot express."""
    cfg = model.config
    if cfg.is_gemma:
        raise ConfigError("ONNX export of Gemma 3 (sliding-window and global layers) is not supported; serve it "
                          "with lmstack serve")
    if cfg.num_experts > 0:
        raise ConfigError(f"ONNX export of mixture-of-experts models ({cfg.model_type}) is not supported: "
                          "their routing is data-dependent; export a dense model, or use --format gguf")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind == "dynamic":
        raise ConfigError("ONNX export of dynamic-NTK RoPE scaling is not supported (its frequencies depend on "
                          "the length of each forward pass); use --format gguf")


def example_inputs(model: Transformer, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[Any, ...]:
    """Example inputs for tracing; every dynamic size > 1 so torch.export does not specialise it."""
    cfg, dt = model.config, model.dtype
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = tuple(torch.zeros(batch, cfg.num_key_value_heads, past, cfg.head_dim, dtype=dt)
               for _ in range(2 * cfg.num_hidden_layers))
    return ids, mask, pos, kv


def _rename_dims(program: Any, n_layers: int, vocab: int) -> None:
    """torch.export names derived sizes ``s53`` / ``s0 + s1``; give the graph's inputs and outputs the names
    optimum and onnxruntime-genai use."""
    import onnx_ir as ir

    def reshape(value: Any, dims: list[Any]) -> None:
        value.shape = ir.Shape(dims)

    g = program.model.graph
    for v in g.inputs:
        if v.name == "attention_mask":
            reshape(v, ["batch", "total_sequence_length"])
        elif v.name.startswith("past_key_values."):
            reshape(v, ["batch", v.shape[1], "past_sequence_length", v.shape[3]])
        else:
            reshape(v, ["batch", "sequence_length"])
    for v in g.outputs:
        if v.name == "logits":
            reshape(v, ["batch", "sequence_length", vocab])
        else:
            reshape(v, ["batch", v.shape[1], "total_sequence_length", v.shape[3]])


def require(*modules: str) -> None:
    """One line naming the extra to install when onnx / onnxscript / onnxruntime is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: pip install 'lmstack[onnx]'")


def trace_onnx(model: Transformer, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` (lmstack Transformer, float32 or float16, on CPU) to the ONNX file ``path``."""
    require("onnx", "onnxscript")
    check_exportable(model)
    cfg = model.config
    L = cfg.num_hidden_layers
    ex = example_inputs(model)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence_length"), \
        torch.export.Dim("past_sequence_length")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq},
               tuple({0: batch, 2: past} for _ in range(2 * L)))
    wrapper = OnnxDecoder(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, ex, input_names=input_names(L), output_names=output_names(L),
                                    dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, verbose=False,
                                    optimize=True)
    _rename_dims(program, L, cfg.vocab_size)
    program.model.metadata_props.update({
        "lmstack.model_type": cfg.model_type, "lmstack.kv_layout": "past_key_values.N.key/value (B,KV,S,D)"})
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program.save(str(path), external_data=external_data)
    return Path(path)


GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def genai_config(cfg, gen: dict) -> dict:
    """onnxruntime-genai's ``genai_config.json`` for the exported graph (its configuration reference:
    the decoder's file, sizes, the input / output names with ``%d`` for the layer, and the search defaults).
    The graph's ``present`` outputs hold past + new keys (not a shared buffer)."""
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    eos_first = eos[0] if isinstance(eos, list) and eos else eos
    pad = gen.get("pad_token_id", cfg.pad_token_id)
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", cfg.bos_token_id),
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos_first,
            "type": GENAI_TYPES.get(cfg.model_type, cfg.model_type),
            "vocab_size": cfg.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": cfg.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "f32",
                adapter: str | os.PathLike | None = None, external_data: bool | None = None,
                group_size: int = 32) -> Path:
    """Write ``out_dir``: ``model.onnx`` (+ ``model.onnx.data`` for large models), ``config.json``,
    ``generation_config.json``, onnxruntime-genai's ``genai_config.json`` and the tokenizer files of ``model_dir`` (with ``adapter`` merged in first).

    ``dtype`` ``int8`` / ``int4``: the linear layers as onnxruntime ``MatMulNBits`` with lmstack's quantized weights
    (:mod:`lmstack.export.onnx_quant`): those of an ``lmstack quantize`` directory, or of a float model quantized
    here (round to nearest, int4 groups of ``group_size``)."""
    from lmstack.export.adapter import merged_source
    from lmstack.export.gguf_export import refuse_quantized
    from lmstack.model.hf_io import copy_tokenizer, generation_config, load_model
    from lmstack.quant.checkpoint import quantization_config

    from lmstack.export.onnx_quant import ONNX_QUANT_DTYPES

    require("onnx", "onnxscript")
    if dtype not in ONNX_DTYPES + ONNX_QUANT_DTYPES:
        raise ConfigError(f"ONNX dtype {dtype!r} is not supported; choose one of "
                          f"{', '.join(ONNX_DTYPES + ONNX_QUANT_DTYPES)}")
    src, out = Path(model_dir), Path(out_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src}: model directory not found")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: ONNX export writes a directory (model.onnx + config + tokenizer); "
                          "this path is a file")
    if dtype in ONNX_QUANT_DTYPES:
        if adapter is not None and quantization_config(src) is not None:
            raise ConfigError(f"{src} is already quantized: merge the adapter into the float model, then export "
                              f"with --dtype {dtype}")
    else:
        refuse_quantized(src, " (or export it with --dtype int8 / int4)")
    with merged_source(src, adapter, out) as base:
        packed = None
        if dtype in ONNX_QUANT_DTYPES:
            from lmstack.export.onnx_quant import dequantized_copy, quantized_model

            model = quantized_model(base, dtype, group_size)
            packed = dequantized_copy(model)
        else:
            model = load_model(base, device="cpu", dtype=_TORCH_DTYPE[dtype])
        check_exportable(model)
        with atomic_dir(out) as tmp:
            trace_onnx(model, tmp / MODEL_FILE, external_data=external_data)
            if packed is not None:
                from lmstack.export.onnx_quant import finish_quantized

                finish_quantized(tmp / MODEL_FILE, packed, dtype,
                                 0 if external_data else EXTERNAL_DATA_BYTES if external_data is None else 1 << 62)
            hf = model.config.to_hf()
            hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
            atomic_write_json(tmp / "config.json", hf)
            gen = generation_config(model.config, base)
            atomic_write_json(tmp / "generation_config.json", gen)
            atomic_write_json(tmp / "genai_config.json", genai_config(model.config, gen))
            copy_tokenizer(base, tmp)
    return out
