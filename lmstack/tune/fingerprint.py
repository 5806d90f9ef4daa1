"""A base-model fingerprint stored with every adapter lmstack saves, checked when the adapter is applied.

An adapter applied to a base it was not trained on loads without a shape error whenever the shapes agree
(same architecture, other weights) and produces garbage. The fingerprint names the base by its numbers, not
its path: the architecture fields that set tensor shapes, plus a fixed sample of the input-embedding table
(8 rows spread over the vocabulary x the first 16 dims). Embeddings are never quantized or adapted by lmstack,
so the sample is the same for the fp32, bf16, int8 or int4 copies of one base (compared by cosine > 0.999 and
a norm ratio within 1%: bf16 rounding moves them ~1e-5; two different trainings give cosines near 0).

Stored as the ``lmstack.base_fingerprint`` metadata entry of ``adapter_model.safetensors`` (PEFT ignores
metadata, so the directory still loads in ``peft``). An adapter without it (written by PEFT or an older
lmstack) is checked by shapes only.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

KEY = "lmstack.base_fingerprint"
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")
ROWS, DIMS = 8, 16


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of ``model`` (an lmstack Transformer or encoder, adapters applied or not)."""
    c = model.config
    table = getattr(getattr(model, "model", None), "embed_tokens", None)
    if table is None:  # an encoder (BERT, ModernBERT): its first embedding table is the token one
        table = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    emb = table.weight.detach()  # (V, H)
    v, h = emb.shape
    rows = torch.linspace(0, v - 1, ROWS).round().long().tolist()
    sample = emb[rows, : min(DIMS, h)].to("cpu", torch.float64).flatten().tolist()
    return {"format": "lmstack-base-fingerprint-v1", **{k: getattr(c, k, None) for k in SHAPE_FIELDS},
            "embed_rows": rows, "embed_sample": [float(f"{x:.6g}") for x in sample]}


def encode(fp: dict[str, Any]) -> str:
    return json.dumps(fp, separators=(",", ":"))


def decode(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        fp = json.loads(raw)
    except ValueError:
        return None
    return fp if isinstance(fp, dict) and fp.get("format") == "lmstack-base-fingerprint-v1" else None


def mismatch(saved: dict[str, Any], model: nn.Module) -> str | None:
    """Why ``model`` is not the base ``saved`` describes (one phrase), or None when it is."""
    now = base_fingerprint(model)
    for k in SHAPE_FIELDS:
        if saved.get(k) != now[k]:
            return f"{k} is {now[k]} here but {saved.get(k)} in the adapter's base"
    a, b = saved.get("embed_sample") or [], now["embed_sample"]
    if saved.get("embed_rows") != now["embed_rows"] or len(a) != len(b):
        return "the embedding sample differs in layout"
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return None if na == nb else "the embedding weights differ"
    cos = sum(x * y for x, y in zip(a, b)) / (na * nb)
    if cos < 0.999 or abs(na / nb - 1) > 0.01:
        return f"the embedding weights differ (cosine {cos:.3f} between samples)"
    return None
