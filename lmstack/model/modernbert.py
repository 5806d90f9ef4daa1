"""ModernBERT (Warner et al. 2024, "Smarter, Better, Faster, Longer"): a pre-norm bidirectional encoder with RoPE,
GeGLU feed-forward blocks, bias-free LayerNorms and alternating global / local (sliding-window) attention.

Loads and saves Hugging Face ``ModernBertModel`` / ``ModernBertForMaskedLM`` / ``ModernBertForSequenceClassification``
/ ``ModernBertForTokenClassification`` directories (module names are the HF parameter names, so loading is a key copy); numerics follow ``transformers``'
``modeling_modernbert.py`` on its SDPA path:

- embeddings: token embedding -> LayerNorm (no positions: RoPE in attention);
- layer: ``x + Wo(attn(attn_norm(x)))`` (layer 0 has no ``attn_norm``), then ``x + Wo(act(a) * g)`` with
  ``a, g = Wi(mlp_norm(x)).chunk(2)``; a final LayerNorm after the last layer;
- attention: fused ``Wqkv``; RoPE with base ``rope_theta`` of the layer type (global 160k, local 10k by default);
  every ``global_attn_every_n_layers``-th layer (``layer_types``) attends to all real tokens, the others to keys
  within ``local_attention // 2`` positions on either side;
- heads: ``head`` = dense -> act -> LayerNorm, then ``decoder`` (tied to the embedding, with bias) for MLM, or
  pooling (the first token, or the mean over real tokens) -> ``head`` -> ``classifier`` for sequence classification,
  ``head`` -> ``classifier`` at every token for token classification.

Trainable by the same loops as the BERT encoder: masked-LM pretraining (``lmstack pretrain`` with
``model.arch: encoder, model.preset: modernbert-tiny``, or ``from_dir`` a ``ModernBertForMaskedLM`` directory),
sequence / token classification (``lmstack classify train --model DIR``). Dropout follows transformers'
``embedding_dropout`` / ``attention_dropout`` / ``mlp_dropout`` / ``classifier_dropout`` (all 0 by default); the
loss and gradients equal ``transformers``' (tests/test_modernbert_train.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import CheckpointError, ConfigError
from lmstack.utils.io import atomic_write_json

HEADS = {"ModernBertModel": "base", "ModernBertForMaskedLM": "mlm", "ModernBertForSequenceClassification": "seq_cls",
         "ModernBertForTokenClassification": "tok_cls"}
_ARCH = {v: k for k, v in HEADS.items()}
ACTS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}


@dataclass
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_types: list[str]
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    local_attention: int = 128
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    classifier_bias: bool = False
    classifier_pooling: str = "cls"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    head: str = "base"
    id2label: dict[int, str] = field(default_factory=dict)
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    classifier_dropout: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)  # the config.json, written back on save (fields override)

    model_type = "modernbert"  # (not a field) what lmstack.model.encoder dispatches on

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def with_head(self, head: str, id2label: dict[int, str] | None = None) -> "ModernBertConfig":
        """The same body under another head (``mlm``, ``seq_cls``, ``tok_cls``, ``base``)."""
        if head not in _ARCH:
            raise ConfigError(f"ModernBERT head {head!r}; supported: {', '.join(_ARCH)}")
        return replace(self, head=head, id2label=dict(id2label or {}) if head in ("seq_cls", "tok_cls") else {})

    def to_hf(self) -> dict[str, Any]:
        """config.json: the loaded file's keys (token ids and the like) with every field of this config on top."""
        every = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
        d = {**self.raw, "model_type": "modernbert", "architectures": [_ARCH[self.head]],
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
             "num_attention_heads": self.num_attention_heads, "layer_types": list(self.layer_types),
             "global_attn_every_n_layers": every[1] - every[0] if len(every) > 1 else self.num_hidden_layers,
             "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta}},
             "local_attention": self.local_attention, "hidden_activation": self.hidden_activation,
             "classifier_activation": self.classifier_activation, "norm_eps": self.norm_eps,
             "norm_bias": self.norm_bias, "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
             "decoder_bias": self.decoder_bias, "classifier_bias": self.classifier_bias,
             "classifier_pooling": self.classifier_pooling, "tie_word_embeddings": self.tie_word_embeddings,
             "pad_token_id": self.pad_token_id, "max_position_embeddings": self.max_position_embeddings,
             "initializer_range": self.initializer_range, "embedding_dropout": self.embedding_dropout,
             "attention_dropout": self.attention_dropout, "mlp_dropout": self.mlp_dropout,
             "classifier_dropout": self.classifier_dropout}
        for k in ("global_rope_theta", "local_rope_theta", "id2label", "label2id", "num_labels"):
            d.pop(k, None)
        for k in ("bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id"):
            d.setdefault(k, None)  # not transformers' defaults (ids of its own 50k vocabulary)
        if self.head in ("seq_cls", "tok_cls"):
            d["id2label"] = {str(i): v for i, v in sorted(self.id2label.items())}
            d["label2id"] = {v: i for i, v in sorted(self.id2label.items())}
        return d

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModernBertConfig":
        p = Path(path) / "config.json"
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p}: cannot read config.json ({e})") from None
        if d.get("model_type") != "modernbert":
            raise CheckpointError(f'{p} has model_type "{d.get("model_type")}"; expected modernbert')
        arch = (d.get("architectures") or ["ModernBertModel"])[0]
        if arch not in HEADS:
            raise CheckpointError(f"{p}: architecture {arch!r} is not supported; supported: {', '.join(HEADS)}")
        n = int(d["num_hidden_layers"])
        every = int(d.get("global_attn_every_n_layers", 3))
        types = d.get("layer_types") or ["sliding_attention" if i % every else "full_attention" for i in range(n)]
        rp = d.get("rope_parameters") or {}
        thetas = {}
        for t, default, legacy in (("full_attention", 160_000.0, "global_rope_theta"),
                                   ("sliding_attention", 10_000.0, "local_rope_theta")):
            params = rp.get(t) or {}
            if params.get("rope_type", "default") != "default":
                raise CheckpointError(f"{p}: rope type {params['rope_type']!r} ({t}) is not supported (only default)")
            thetas[t] = float(params.get("rope_theta", d.get(legacy, default)))
        for k in ("hidden_activation", "classifier_activation"):
            if d.get(k, "gelu") not in ACTS:
                raise CheckpointError(f"{p}: {k} {d[k]!r} is not supported; supported: {', '.join(ACTS)}")
        if d.get("classifier_pooling", "cls") not in ("cls", "mean"):
            raise CheckpointError(f"{p}: classifier_pooling {d['classifier_pooling']!r}; supported: cls, mean")
        if d.get("problem_type") not in (None, "single_label_classification"):
            raise CheckpointError(f"{p}: problem_type {d['problem_type']!r} is not supported")
        head = HEADS[arch]
        id2label = ({int(k): str(v) for k, v in (d.get("id2label") or {}).items()}
                    if head in ("seq_cls", "tok_cls") else {})
        return cls(vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
                   intermediate_size=int(d["intermediate_size"]), num_hidden_layers=n,
                   num_attention_heads=int(d["num_attention_heads"]), layer_types=list(types),
                   global_rope_theta=thetas["full_attention"], local_rope_theta=thetas["sliding_attention"],
                   local_attention=int(d.get("local_attention", 128)),
                   hidden_activation=d.get("hidden_activation", "gelu"),
                   classifier_activation=d.get("classifier_activation", "gelu"),
                   norm_eps=float(d.get("norm_eps", 1e-5)), norm_bias=bool(d.get("norm_bias", False)),
                   attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
                   decoder_bias=bool(d.get("decoder_bias", True)), classifier_bias=bool(d.get("classifier_bias", False)),
                   classifier_pooling=d.get("classifier_pooling", "cls"),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                   pad_token_id=int(d.get("pad_token_id") or 0), head=head, id2label=id2label,
                   max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
                   initializer_range=float(d.get("initializer_range", 0.02)),
                   embedding_dropout=float(d.get("embedding_dropout", 0.0)),
                   attention_dropout=float(d.get("attention_dropout", 0.0)),
                   mlp_dropout=float(d.get("mlp_dropout", 0.0)),
                   classifier_dropout=float(d.get("classifier_dropout", 0.0)), raw=d)


# Shapes for MLM pretraining from scratch (``model.arch: encoder`` with one of these presets): the layout of
# answerdotai/ModernBERT-base (GeGLU, a global layer every third, local window 128, RoPE 160k / 10k), scaled down.
MODERNBERT_PRESETS: dict[str, dict[str, Any]] = {
    "modernbert-tiny": dict(hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2),
    "modernbert-mini": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4),
}


def modernbert_preset(name: str, **overrides: Any) -> ModernBertConfig:
    """A :class:`ModernBertConfig` from a named shape plus field overrides (``vocab_size``, ``head``,
    ``global_attn_every_n_layers``, ``local_attention``, ...); unknown names and fields are refused in one line."""
    if name not in MODERNBERT_PRESETS:
        raise ConfigError(f"unknown ModernBERT preset {name!r}; choose from {', '.join(MODERNBERT_PRESETS)}")
    kw = {**MODERNBERT_PRESETS[name], **overrides}
    every = int(kw.pop("global_attn_every_n_layers", 3))
    kw.setdefault("layer_types", ["sliding_attention" if i % every else "full_attention"
                                  for i in range(int(kw["num_hidden_layers"]))])
    kw.setdefault("vocab_size", 8192)
    fields = set(ModernBertConfig.__dataclass_fields__) - {"raw"}
    bad = sorted(set(kw) - fields)
    if bad:
        raise ConfigError(f"unknown ModernBERT field(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
    if kw["hidden_size"] % kw["num_attention_heads"]:
        raise ConfigError(f"hidden_size ({kw['hidden_size']}) must be a multiple of num_attention_heads "
                          f"({kw['num_attention_heads']})")
    for k in ("hidden_activation", "classifier_activation"):
        if kw.get(k, "gelu") not in ACTS:
            raise ConfigError(f"{k} {kw[k]!r} is not supported; supported: {', '.join(ACTS)}")
    cfg = ModernBertConfig(**kw)
    cfg.with_head(cfg.head)  # validates the head
    return cfg


def _norm(c: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)


class _Embeddings(nn.Module):
    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.norm = _norm(c)
        self.drop = nn.Dropout(c.embedding_dropout)

    def forward(self, ids: Tensor) -> Tensor:
        return self.drop(self.norm(self.tok_embeddings(ids)))


class _Attention(nn.Module):
    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.n_heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.Wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.attention_bias)
        self.Wo = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)
        self.p_drop = c.attention_dropout
        self.out_drop = nn.Dropout(c.attention_dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p_drop if self.training else 0.0)
        return self.out_drop(self.Wo(o.transpose(1, 2).reshape(B, T, -1)))


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)


class _MLP(nn.Module):
    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.Wo = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = ACTS[c.hidden_activation]
        self.drop = nn.Dropout(c.mlp_dropout)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.Wi(x).chunk(2, -1)
        return self.Wo(self.drop(self.act(a) * g))


class _Layer(nn.Module):
    def __init__(self, c: ModernBertConfig, i: int):
        super().__init__()
        self.attn_norm = nn.Identity() if i == 0 else _norm(c)
        self.attn = _Attention(c)
        self.mlp_norm = _norm(c)
        self.mlp = _MLP(c)
        self.local = c.layer_types[i] == "sliding_attention"

    def forward(self, x: Tensor, rope: dict[bool, tuple[Tensor, Tensor]], masks: dict[bool, Tensor | None]) -> Tensor:
        x = x + self.attn(self.attn_norm(x), *rope[self.local], masks[self.local])
        return x + self.mlp(self.mlp_norm(x))


class _Body(nn.Module):
    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.layers = nn.ModuleList(_Layer(c, i) for i in range(c.num_hidden_layers))
        self.final_norm = _norm(c)


class _Head(nn.Module):
    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=c.classifier_bias)
        self.act = ACTS[c.classifier_activation]
        self.norm = _norm(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(x)))


class ModernBert(nn.Module):
    """One class, the head as data: hidden states (B, T, H) for ``base``, vocab logits (B, T, V) for ``mlm``,
    label logits (B, L) for ``seq_cls``, (B, T, L) for ``tok_cls``."""

    def __init__(self, c: ModernBertConfig):
        super().__init__()
        self.config = c
        self.model = _Body(c)
        if c.head in ("mlm", "seq_cls", "tok_cls"):
            self.head = _Head(c)
        if c.head == "mlm":
            self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=c.decoder_bias)
            if c.tie_word_embeddings:
                self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        if c.head in ("seq_cls", "tok_cls"):
            self.drop = nn.Dropout(c.classifier_dropout)
            self.classifier = nn.Linear(c.hidden_size, len(c.id2label))

    def tie_weights(self) -> None:
        if self.config.head == "mlm" and self.config.tie_word_embeddings:
            self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def init_weights(self, seed: int | None = None) -> "ModernBert":
        """Normal(0, initializer_range) for matrices and embeddings, LayerNorm weights 1, biases 0 (transformers
        draws truncated normals with per-module scales; a from-scratch run only needs a sane start)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, (nn.Linear, nn.Embedding)):
                    if not (name == "decoder" and self.config.tie_word_embeddings):
                        m.weight.copy_(torch.empty(m.weight.shape).normal_(0.0, std, generator=g).to(m.weight.dtype))
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
        return self

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean-pooled sentence embeddings (B, H) over the real tokens."""
        h = self.hidden_states(input_ids, attention_mask)
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        c = self.config
        B, T = input_ids.shape
        x = self.model.embeddings(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        keys = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, T)
        near = ((pos[:, None] - pos[None, :]).abs() <= c.local_attention // 2)[None, None]  # (1, 1, T, T)
        masks = {False: keys, True: near if keys is None else keys & near}
        hd = c.hidden_size // c.num_attention_heads
        rope = {}
        for local, theta in ((False, c.global_rope_theta), (True, c.local_rope_theta)):
            inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=x.device) / hd))
            freqs = pos.float()[:, None] * inv
            emb = torch.cat((freqs, freqs), -1)
            rope[local] = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        for layer in self.model.layers:
            x = layer(x, rope, masks)
        return self.model.final_norm(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.hidden_states(input_ids, attention_mask)
        if self.config.head == "mlm":
            return self.decoder(self.head(h))
        if self.config.head == "seq_cls":
            if self.config.classifier_pooling == "cls":
                pooled = h[:, 0]
            else:
                m = (attention_mask if attention_mask is not None else torch.ones(h.shape[:2])).to(h.dtype)
                pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            return self.classifier(self.drop(self.head(pooled)))
        if self.config.head == "tok_cls":
            return self.classifier(self.drop(self.head(h)))
        return h


def load_modernbert(path: str | Path) -> ModernBert:
    """A ModernBERT directory (safetensors) as :class:`ModernBert` (fp32, CPU, eval)."""
    from lmstack.model.hf_io import read_state_dict

    path = Path(path)
    cfg = ModernBertConfig.from_hf(path)
    with torch.device("meta"):
        model = ModernBert(cfg)
    sd = dict(read_state_dict(path))
    if cfg.head == "base":
        sd = {f"model.{k}" if not k.startswith("model.") else k: v for k, v in sd.items()}
    want = model.state_dict()
    if cfg.head == "mlm" and cfg.tie_word_embeddings:
        sd["decoder.weight"] = sd["model.embeddings.tok_embeddings.weight"]
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise CheckpointError(f"{path}: weights do not match config.json (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)} but config.json implies "
                                  f"{tuple(want[k].shape)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, assign=True, strict=True)
    if cfg.head == "mlm" and cfg.tie_word_embeddings:
        model.decoder.weight = model.model.embeddings.tok_embeddings.weight
    return model.eval()


def save_modernbert(model: ModernBert, path: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json and model.safetensors (and the tokenizer) so ``transformers`` loads the directory."""
    from lmstack.model.hf_io import _save_safetensors, copy_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    tensors = {}
    for k, t in model.state_dict().items():
        if c.head == "mlm" and c.tie_word_embeddings and k == "decoder.weight":
            continue
        tensors[k.removeprefix("model.") if c.head == "base" else k] = t.detach().cpu().contiguous()
    _save_safetensors(tensors, path / "model.safetensors")
    atomic_write_json(path / "config.json", c.to_hf())
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path)
    return path


__all__ = ["ModernBert", "ModernBertConfig", "load_modernbert", "save_modernbert", "modernbert_preset",
           "MODERNBERT_PRESETS"]
