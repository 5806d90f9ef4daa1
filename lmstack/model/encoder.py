"""A BERT-style bidirectional encoder with masked-LM, sequence- and token-classification heads.

BERT (Devlin et al. 2019): token + position + segment embeddings -> LayerNorm, then post-norm layers of
bidirectional multi-head attention and a GELU MLP (``x = LN(x + Attn(x)); x = LN(x + MLP(x))``). Heads:
masked LM (dense -> act -> LN -> vocab logits tied to the word embeddings, + bias), sequence classification
(tanh pooler over the first token -> linear), token classification (linear per token). Sentence embeddings are
the mask-weighted mean of the last hidden states (Sentence-BERT, Reimers & Gurevych 2019).

Module names are ``transformers``' ``BertModel`` / ``BertForMaskedLM`` / ``BertForSequenceClassification`` /
``BertForTokenClassification`` names (``bert.encoder.layer.0.attention.self.query.weight``), so a checkpoint is
a key copy; a bare ``BertModel`` directory stores the body without the ``bert.`` prefix. Numerics follow
``modeling_bert.py`` (tests/test_model_encoder.py checks logits against it). MLM inputs use dynamic masking with
BERT's 80/10/10 rule (:func:`mlm_inputs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.config import read_hf_config
from lmstack.utils.io import atomic_write_json

HEADS = {  # architecture -> head
    "BertModel": "base", "BertForMaskedLM": "mlm", "BertForSequenceClassification": "seq_cls",
    "BertForTokenClassification": "tok_cls", "BertForPreTraining": "mlm",
}
_ARCH = {"base": "BertModel", "mlm": "BertForMaskedLM", "seq_cls": "BertForSequenceClassification",
         "tok_cls": "BertForTokenClassification"}
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}
IGNORE_INDEX = -100


@dataclass
class EncoderConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True
    head: str = "base"  # base | mlm | seq_cls | tok_cls
    id2label: dict[int, str] = field(default_factory=dict)
    model_type: str = "bert"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head not in _ARCH:
            raise ConfigError(f"encoder head {self.head!r}; supported: {', '.join(_ARCH)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.head in ("seq_cls", "tok_cls") and not self.id2label:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "EncoderConfig":
        d, where = read_hf_config(source)
        if d.get("model_type") != "bert":
            raise CheckpointError(f'{where} has model_type "{d.get("model_type")}"; the encoder supports: bert')
        arch = (d.get("architectures") or ["BertModel"])[0]
        if arch not in HEADS:
            raise CheckpointError(f"{where}: architecture {arch!r} is not supported; supported: {', '.join(HEADS)}")
        for k, bad in (("is_decoder", True), ("add_cross_attention", True)):
            if d.get(k) is bad:
                raise CheckpointError(f"{where}: {k}=true (a BERT decoder) is not supported; lmstack's encoder is "
                                      "bidirectional")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise CheckpointError(f"{where}: position_embedding_type {pet!r} is not supported (only absolute)")
        if d.get("problem_type") not in (None, "single_label_classification"):
            raise CheckpointError(f"{where}: problem_type {d['problem_type']!r} is not supported "
                                  "(only single_label_classification)")
        keys = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "type_vocab_size", "layer_norm_eps", "initializer_range", "pad_token_id", "classifier_dropout",
                "tie_word_embeddings"}
        kw = {k: d[k] for k in keys if k in d and d[k] is not None or k == "classifier_dropout" and k in d}
        if kw.get("pad_token_id") is None:
            kw["pad_token_id"] = 0
        kw["head"] = HEADS[arch]
        if HEADS[arch] in ("seq_cls", "tok_cls"):
            kw["id2label"] = d.get("id2label") or {i: f"LABEL_{i}" for i in range(int(d.get("num_labels", 2)))}
        kw["extra"] = {k: v for k, v in d.items() if k not in keys and k not in (
            "architectures", "model_type", "id2label", "label2id", "num_labels")}
        try:
            return cls(**kw)
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("head", "id2label", "extra")}
        d["architectures"] = [_ARCH[self.head]]
        if self.id2label:
            d["id2label"] = {str(i): v for i, v in sorted(self.id2label.items())}
            d["label2id"] = {v: i for i, v in sorted(self.id2label.items())}
        d["is_decoder"] = False
        d["add_cross_attention"] = False
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d


# Encoder presets for MLM pretraining from scratch (`lmstack pretrain` with model.arch: encoder). The shapes of
# Google's small BERTs (Turc et al. 2019, "Well-Read Students Learn Better"): L layers, H hidden, H/64 heads, 4H FFN.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
}


def encoder_preset(name: str, **overrides: Any) -> EncoderConfig:
    """An :class:`EncoderConfig` from a named shape (``bert-tiny`` / ``bert-mini`` / ``bert-small``) plus field
    overrides (``vocab_size``, ``head``, ...); unknown names and fields are refused with one line."""
    if name not in ENCODER_PRESETS:
        raise ConfigError(f"unknown encoder preset {name!r}; choose from {', '.join(ENCODER_PRESETS)}")
    fields = set(EncoderConfig.__dataclass_fields__) - {"extra"}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"unknown encoder field(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
    return EncoderConfig(**{**ENCODER_PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------- modules
class _Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        T = ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ConfigError(f"input of {T} tokens is longer than max_position_embeddings "
                              f"({self.position_embeddings.num_embeddings}); truncate it")
        x = self.word_embeddings(ids) + self.position_embeddings(torch.arange(T, device=ids.device))[None]
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(ids)
        return self.dropout(self.LayerNorm(x + self.token_type_embeddings(tt)))


class _SelfAttention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.n_heads, self.p = c.num_attention_heads, c.attention_probs_dropout_prob


class _DenseNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): BERT's SelfOutput and Output."""

    def __init__(self, c: EncoderConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c, c.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, H = x.shape
        a = self.self
        nh = a.n_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, nh, H // nh).transpose(1, 2)  # (B, heads, T, D)

        o = F.scaled_dot_product_attention(heads(a.query(x)), heads(a.key(x)), heads(a.value(x)), attn_mask=mask,
                                           dropout_p=a.p if self.training else 0.0)
        return self.output(o.transpose(1, 2).reshape(B, T, H), x)


class _Intermediate(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c, c.intermediate_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Stack(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class _Pooler(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class _Body(nn.Module):
    """``BertModel``: embeddings, encoder layers and (for the base and sequence-classification heads) pooler."""

    def __init__(self, c: EncoderConfig, pooler: bool):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.encoder = _Stack(c)
        self.pooler = _Pooler(c) if pooler else None


class _Transform(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class _Predictions(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.transform = _Transform(c)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.transform(h)) + self.bias


class _MLMHead(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.predictions = _Predictions(c)


class Encoder(nn.Module):
    """One encoder class; the head is data (``config.head``). ``forward`` returns the head's output:
    hidden states (B, T, H) for ``base``, vocab logits (B, T, V) for ``mlm``, label logits (B, L) for
    ``seq_cls`` and (B, T, L) for ``tok_cls``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.bert = _Body(cfg, pooler=cfg.head in ("base", "seq_cls"))
        if cfg.head == "mlm":
            self.cls = _MLMHead(cfg)
            if cfg.tie_word_embeddings:
                self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        if cfg.head in ("seq_cls", "tok_cls"):
            p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
            self.dropout = nn.Dropout(p)
            self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def tie_weights(self) -> None:
        if self.config.head == "mlm" and self.config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def init_weights(self, seed: int | None = None) -> "Encoder":
        """Normal(0, initializer_range) for matrices and embeddings, LayerNorm 1/0, biases 0 (as transformers)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "LayerNorm.weight" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=g).to(p.dtype))
        return self

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """Last hidden states (B, T, H). attention_mask (B, T): 1 for tokens, 0 for padding (keys only)."""
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the real keys
        x = self.bert.embeddings(input_ids, token_type_ids)
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)
        head = self.config.head
        if head == "mlm":
            return self.cls.predictions(h)
        if head == "seq_cls":
            return self.classifier(self.dropout(self.bert.pooler(h)))
        if head == "tok_cls":
            return self.classifier(self.dropout(h))
        return h

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean-pooled sentence embeddings (B, H): the average of the last hidden states over real tokens."""
        h = self.hidden_states(input_ids, attention_mask)
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


# ---------------------------------------------------------------------------------------------- MLM masking
def mlm_inputs(input_ids: Tensor, *, mask_token_id: int, vocab_size: int, special_ids: set[int] | None = None,
               mlm_probability: float = 0.15, attention_mask: Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's dynamic masking: each real, non-special token is selected with ``mlm_probability``; a selected
    token becomes ``mask_token_id`` 80% of the time, a uniformly random token 10%, and stays itself 10%.
    Returns (inputs, labels): labels hold the original id at selected positions and -100 elsewhere."""
    ids = input_ids.clone()
    eligible = torch.ones_like(ids, dtype=torch.bool)
    for s in special_ids or ():
        eligible &= ids != s
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    u = torch.rand(ids.shape, generator=generator)
    selected = (u < mlm_probability) & eligible
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    r = torch.rand(ids.shape, generator=generator)
    to_mask = selected & (r < 0.8)
    to_random = selected & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    ids = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    ids = torch.where(to_random, random_ids, ids)
    return ids, labels


def mlm_loss(model: Encoder, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    logits = model(input_ids, attention_mask)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------- HF I/O
def encoder_type(path: str | Path) -> str:
    """``bert`` or ``modernbert``: the encoder family of a model directory (its config.json's model_type)."""
    d, _ = read_hf_config(path)
    return "modernbert" if d.get("model_type") == "modernbert" else "bert"


def encoder_head(path: str | Path) -> str:
    """The head of an encoder directory (base, mlm, seq_cls, tok_cls), BERT or ModernBERT."""
    if encoder_type(path) == "modernbert":
        from lmstack.model.modernbert import ModernBertConfig

        return ModernBertConfig.from_hf(path).head
    return EncoderConfig.from_hf(path).head


def with_head(model: nn.Module, head: str, id2label: dict[int, str], seed: int) -> nn.Module:
    """A fresh model of ``model``'s family and body shape under ``head`` (initialized with ``seed``), carrying
    ``model``'s body weights (a pretrained encoder fine-tuned for classification)."""
    if type(model).__name__ == "ModernBert":
        from lmstack.model.modernbert import ModernBert

        new = ModernBert(model.config.with_head(head, id2label)).init_weights(seed)
        prefix = "model."
    else:
        c = model.config
        new = Encoder(EncoderConfig(**{**{k: v for k, v in asdict(c).items() if k not in ("head", "id2label")},
                                       "head": head, "id2label": id2label})).init_weights(seed)
        prefix = "bert."
    body = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    missing = [k for k in new.state_dict() if k.startswith(prefix) and k not in body]
    new.load_state_dict(body, strict=False)
    if missing and not all(k.endswith("pooler.dense.weight") or k.endswith("pooler.dense.bias") for k in missing):
        raise CheckpointError(f"the body of the initial encoder lacks {missing[0]}")
    return new


def load_encoder(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 ) -> Encoder:
    """Load a local BERT directory (BertModel / ForMaskedLM / ForSequenceClassification / ForTokenClassification),
    or a ModernBERT one (the same heads; :mod:`lmstack.model.modernbert`)."""
    from lmstack.model.hf_io import read_state_dict

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory not found")
    if encoder_type(path) == "modernbert":
        from lmstack.model.modernbert import load_modernbert

        return load_modernbert(path).to(device=device, dtype=dtype)
    cfg = EncoderConfig.from_hf(path)
    sd = read_state_dict(path)
    if cfg.head == "base":  # a bare BertModel stores the body without the prefix
        sd = {("bert." + k if not k.startswith("bert.") else k): v for k, v in sd.items()}
    sd.pop("bert.embeddings.position_ids", None)
    if cfg.head == "mlm":
        dec_bias = sd.pop("cls.predictions.decoder.bias", None)  # older saves store the tied bias twice
        if dec_bias is not None and "cls.predictions.bias" not in sd:
            sd["cls.predictions.bias"] = dec_bias
        if cfg.tie_word_embeddings:
            sd.pop("cls.predictions.decoder.weight", None)
        for k in [k for k in sd if k.startswith("cls.seq_relationship")]:
            del sd[k]  # BertForPreTraining's next-sentence head
    with torch.device("meta"):
        model = Encoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"cls.predictions.decoder.weight"} if cfg.head == "mlm" and cfg.tie_word_embeddings else set()
    missing = [k for k in expected if k not in sd and k not in tied]
    unexpected = sorted(k for k in sd if k not in expected)
    if missing:
        raise CheckpointError(f"{path}: weights are missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if unexpected:
        raise CheckpointError(f"{path}: weights have {len(unexpected)} tensor(s) the config does not describe, "
                              f"e.g. {unexpected[0]}")
    for k, t in sd.items():
        if tuple(t.shape) != expected[k]:
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)} but config.json implies {expected[k]}")
        sd[k] = t.to(device=device, dtype=dtype)
    for k in tied:
        sd[k] = sd["bert.embeddings.word_embeddings.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


def save_encoder(model: Encoder, path: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """Write the encoder (BERT or ModernBERT) as a HF directory ``transformers`` loads (config.json,
    model.safetensors, tokenizer)."""
    from lmstack.model.hf_io import _save_safetensors, copy_tokenizer

    if type(model).__name__ == "ModernBert":
        from lmstack.model.modernbert import save_modernbert

        return save_modernbert(model, path, tokenizer_dir=tokenizer_dir)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {}
    for k, t in model.state_dict().items():
        if cfg.head == "mlm" and cfg.tie_word_embeddings and k == "cls.predictions.decoder.weight":
            continue
        if cfg.head == "base":
            k = k.removeprefix("bert.")
        tensors[k] = t.detach().to("cpu").contiguous()
    _save_safetensors(tensors, path / "model.safetensors")
    atomic_write_json(path / "config.json", cfg.to_hf())
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path)
    return path
