"""Greedy generation over an ONNX decoder that ``lmstack export --format onnx`` wrote, on onnxruntime.

    from lmstack.export.onnx_runtime import OnnxCausalLM
    lm = OnnxCausalLM("sft-onnx")                        # the directory (or its model.onnx)
    out = lm.generate([[1, 2, 3], [4, 5]], max_new_tokens=16, eos_token_id=2)   # new ids per prompt

The loop is the one optimum / onnxruntime-genai run: prefill with an empty past (length 0), then one token per
step with the previous ``present.N.*`` fed back as ``past_key_values.N.*``. Prompts of different lengths are
left-padded; ``attention_mask`` marks the padding and ``position_ids`` count real tokens only (the convention of
transformers' ``generate``), so a padded row gets the same tokens as the same prompt alone. The sizes (layers,
KV heads, head dim, dtype) are read from the graph's inputs, not from config.json.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lmstack.errors import CheckpointError, ConfigError

MAX_NEW_TOKENS = 1 << 16  # a cap on one call's loop
_NP_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxCausalLM:
    """An onnxruntime session over ``model.onnx`` with the KV-cache interface of :mod:`.onnx_export`."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("running an ONNX export needs onnxruntime: pip install 'lmstack[onnx]'") from None
        p = Path(path)
        if p.is_dir():
            p = p / "model.onnx"
        if not p.is_file():
            raise CheckpointError(f"{p}: not found (expected a directory written by `lmstack export --format onnx`)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime raises its own exception types for a corrupt or foreign graph
            raise CheckpointError(f"{p}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = sorted((n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")),
                      key=lambda n: int(n.split(".")[1]))
        need = {"input_ids", "attention_mask", "position_ids"}
        if not need <= set(inputs) or not past:
            raise CheckpointError(f"{p}: inputs {sorted(inputs)} are not the KV-cache interface "
                                  "(input_ids, attention_mask, position_ids, past_key_values.N.key/value)")
        self.n_layers = len(past)
        shape = inputs[past[0]].shape  # [batch, n_kv, past_sequence_length, head_dim]
        self.n_kv, self.head_dim = int(shape[1]), int(shape[3])
        self.dtype = _NP_DTYPE.get(inputs[past[0]].type)
        if self.dtype is None:
            raise CheckpointError(f"{p}: KV cache type {inputs[past[0]].type} is not float32 or float16")
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab_size = int(logits.shape[-1])
        self._out_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_kv, 0, self.head_dim), self.dtype) for _ in range(2 * self.n_layers)]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: logits (B, T, vocab) and the present (k, v) per layer, flat [k0, v0, k1, v1, ...]."""
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64),
                 "position_ids": np.asarray(position_ids, np.int64)}
        for i in range(self.n_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outs = dict(zip(self._out_names, self.session.run(None, feeds)))
        present = [outs[f"present.{i}.{kv}"] for i in range(self.n_layers) for kv in ("key", "value")]
        return outs["logits"], present

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> list[list[int]]:
        """Greedy: the new token ids of each prompt (stopping after an eos id, which is kept)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("generate needs at least one prompt, each with at least one token id")
        if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
        for p in prompts:
            bad = [t for t in p if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ConfigError(f"token id {bad[0]} is outside the model's vocabulary (0..{self.vocab_size - 1})")
        stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, T), pad_token_id, np.int64)
        mask = np.zeros((B, T), np.int64)
        for b, p in enumerate(prompts):  # left padding
            ids[b, T - len(p):] = p
            mask[b, T - len(p):] = 1
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        past = self.empty_past(B)
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, mask, pos, past)
            nxt = logits[:, -1].argmax(-1)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
                    done[b] = int(nxt[b]) in stops
            if done.all():
                break
            ids = np.where(done, pad_token_id, nxt)[:, None].astype(np.int64)
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], 1)
        return out
