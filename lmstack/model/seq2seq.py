"""T5 / mT5 / Flan-T5 encoder-decoder (``T5ForConditionalGeneration``) with Hugging Face parameter names.

References: Raffel et al. 2020 ("Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer": relative position buckets, RMS-style layer norm without bias, no 1/sqrt(d) attention scaling);
T5 v1.1 / mT5 (Xue et al. 2021): gated-GELU feed-forward, untied output layer; numerics follow ``transformers``
``modeling_t5.py`` (tests/test_model_seq2seq.py checks logits and greedy output against it).

* v1.0 (``feed_forward_proj = "relu"``): ``wo(relu(wi(x)))``; v1.1 / mT5 / Flan-T5 (``"gated-gelu"``):
  ``wo(gelu_tanh(wi_0(x)) * wi_1(x))``.
* Attention is ``softmax(q k^T + position_bias + mask) v``: no 1/sqrt(d_kv) (folded into the weights' init).
  The bias comes from block 0's ``relative_attention_bias`` (buckets of ``key - query``; bidirectional in the
  encoder, causal in the decoder) and is shared by every block of the stack; cross-attention has none.
* The scaling rule: where the output layer is the (tied) input embedding — ``tie_word_embeddings`` true, or
  ``scale_decoder_outputs`` true in transformers 5 files — the decoder output is multiplied by ``d_model ** -0.5``
  before ``lm_head``. A checkpoint with its own ``lm_head.weight`` (v1.1, mT5, Flan-T5 files) keeps it untied.

Generation (:meth:`Seq2Seq.generate`) runs the encoder once, computes every layer's cross-attention keys and
values once (:class:`Seq2SeqCache`), and appends one key/value per decoder layer per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.config import read_hf_config
from lmstack.utils.io import read_json

SEQ2SEQ_MODEL_TYPES = ("t5", "mt5")
_ACTS = {"relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu,
         "swish": F.silu}


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # defaults to num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) | "gated-gelu" (v1.1, mT5, Flan-T5) | "[gated-]ACT"
    tie_word_embeddings: bool = True  # lm_head is the shared embedding
    scale_decoder_outputs: bool = True  # decoder output * d_model ** -0.5 before lm_head
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"
    torch_dtype: str = "float32"
    initializer_factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.model_type not in SEQ2SEQ_MODEL_TYPES:
            raise ConfigError(f'model_type "{self.model_type}" is not an encoder-decoder lmstack runs; '
                              f'supported: {", ".join(SEQ2SEQ_MODEL_TYPES)}')
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.act_name not in _ACTS:
            raise ConfigError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; supported: relu, "
                              f"gated-gelu, or [gated-]ACT with ACT one of {', '.join(_ACTS)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act_name(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # transformers' compatibility rule

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "Seq2SeqConfig":
        d, where = read_hf_config(source)
        if d.get("model_type") not in SEQ2SEQ_MODEL_TYPES:
            raise CheckpointError(f'{where} has model_type "{d.get("model_type")}"; encoder-decoders supported: '
                                  f'{", ".join(SEQ2SEQ_MODEL_TYPES)}')
        known = {f.name for f in fields(cls)} - {"extra", "scale_decoder_outputs", "torch_dtype"}
        kw: dict[str, Any] = {k: d[k] for k in known if d.get(k) is not None}
        tie = d.get("tie_word_embeddings")
        kw["tie_word_embeddings"] = tie is not False
        scale = d.get("scale_decoder_outputs")  # transformers 5 writes it (and always tie_word_embeddings: true)
        kw["scale_decoder_outputs"] = bool(scale) if scale is not None else tie is not False
        dtype = d.get("dtype") or d.get("torch_dtype")
        kw["torch_dtype"] = dtype if isinstance(dtype, str) else "float32"
        used = set(kw) | {"dtype", "dense_act_fn", "is_gated_act", "scale_decoder_outputs"}
        kw["extra"] = {k: v for k, v in d.items() if k not in used}
        try:
            return cls(**kw)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        d = {k: v for k, v in self.extra.items() if k not in ("architectures",)}
        d.update({
            "architectures": ["MT5ForConditionalGeneration" if self.model_type == "mt5" else "T5ForConditionalGeneration"],
            "model_type": self.model_type, "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.d_kv,
            "d_ff": self.d_ff, "num_layers": self.num_layers, "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads, "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon, "feed_forward_proj": self.feed_forward_proj,
            "tie_word_embeddings": self.tie_word_embeddings, "scale_decoder_outputs": self.scale_decoder_outputs,
            "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id, "is_encoder_decoder": True,
            "initializer_factor": self.initializer_factor, "torch_dtype": self.torch_dtype,
        })
        return d


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position ``key - query``: exact buckets for small distances, logarithmic ones
    up to ``max_distance`` (all farther positions share the last); bidirectional halves the buckets by sign."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)  # only keys at or before the query; distance >= 0
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel < exact, rel, large)


class T5Norm(nn.Module):
    """Scale-only RMS norm: ``w * x * rsqrt(mean(x^2) + eps)`` (variance in fp32; half weights cast x first)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.h, self.d = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def heads(self, proj: nn.Linear, x: Tensor) -> Tensor:  # (B, T, d_model) -> (B, H, T, d_kv)
        B, T, _ = x.shape
        return proj(x).view(B, T, self.h, self.d).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """q (B, H, T, D), k / v (B, H, S, D), bias (B or 1, H or 1, T, S) additive -> (B, T, d_model)."""
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        B, _, T, _ = o.shape
        return self.o(o.transpose(1, 2).reshape(B, T, self.h * self.d))


class _AttnLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, name: str, relative_bias: bool):
        super().__init__()
        self.name = name
        setattr(self, name, T5Attention(cfg, relative_bias))
        self.layer_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)

    @property
    def attn(self) -> T5Attention:
        return getattr(self, self.name)


class _Dense(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.gated = cfg.is_gated
        self.act = _ACTS[cfg.act_name]
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class _FFLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.DenseReluDense = _Dense(cfg)
        self.layer_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class _Block(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, decoder: bool, first: bool):
        super().__init__()
        layers = [_AttnLayer(cfg, "SelfAttention", first)]
        if decoder:
            layers.append(_AttnLayer(cfg, "EncDecAttention", False))
        layers.append(_FFLayer(cfg))
        self.layer = nn.ModuleList(layers)


class _Stack(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, decoder: bool):
        super().__init__()
        n = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.block = nn.ModuleList(_Block(cfg, decoder, i == 0) for i in range(n))
        self.final_layer_norm = T5Norm(cfg.d_model, cfg.layer_norm_epsilon)


@dataclass
class Seq2SeqCache:
    """What generation keeps between decoder steps: the encoder's padding bias (B, 1, 1, S), every decoder layer's
    cross-attention keys / values (computed once from the encoder output) and its self-attention keys / values so
    far (B, H, t, D), grown by one position per step."""

    enc_bias: Tensor
    cross_kv: list[tuple[Tensor, Tensor]]
    self_kv: list[tuple[Tensor, Tensor] | None]
    length: int = 0


class Seq2Seq(nn.Module):
    """``T5ForConditionalGeneration`` with HF names: ``shared``, ``encoder.block.N.layer.M...``, ``lm_head``."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = _Stack(cfg, decoder=False)
        self.decoder = _Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    def init_weights(self, seed: int | None = None) -> "Seq2Seq":
        """Normal init with T5's per-matrix scales (factor 1): q ~ (d_model * d_kv) ** -0.5, k / v / wi ~
        d_model ** -0.5, o ~ (H * d_kv) ** -0.5, wo ~ d_ff ** -0.5, embeddings ~ 1; norms 1."""
        cfg, g = self.config, torch.Generator().manual_seed(seed or 0)
        f = cfg.initializer_factor
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
            std = {"q": (cfg.d_model * cfg.d_kv) ** -0.5, "k": cfg.d_model ** -0.5, "v": cfg.d_model ** -0.5,
                   "o": (cfg.num_heads * cfg.d_kv) ** -0.5, "wi": cfg.d_model ** -0.5, "wi_0": cfg.d_model ** -0.5,
                   "wi_1": cfg.d_model ** -0.5, "wo": cfg.d_ff ** -0.5, "relative_attention_bias": cfg.d_model ** -0.5,
                   "lm_head": 1.0, "shared": 1.0}.get(leaf)
            with torch.no_grad():
                if std is None:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.empty(p.shape).normal_(0, f * std, generator=g).to(p.dtype))
        return self

    # ------------------------------------------------------------------ position bias
    def _position_bias(self, stack: _Stack, q_len: int, k_len: int, offset: int, decoder: bool) -> Tensor:
        """(1, H, q_len, k_len) from block 0's bucket table, query positions offset..offset + q_len - 1."""
        table = stack.block[0].layer[0].attn.relative_attention_bias
        dev = table.weight.device
        rel = torch.arange(k_len, device=dev)[None, :] - (torch.arange(q_len, device=dev)[:, None] + offset)
        cfg = self.config
        buckets = relative_position_bucket(rel, not decoder, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return table(buckets).permute(2, 0, 1)[None]

    def _mask_bias(self, attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, S) 1 / 0 -> (B, 1, 1, S) additive: 0 for tokens, the dtype's minimum for padding."""
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, d_model)."""
        x = self.shared(input_ids)
        S = x.shape[1]
        bias = self._position_bias(self.encoder, S, S, 0, decoder=False).to(x.dtype)
        if attention_mask is not None:
            bias = bias + self._mask_bias(attention_mask, x.dtype)
        for blk in self.encoder.block:
            sa, ff = blk.layer[0], blk.layer[1]
            h = sa.layer_norm(x)
            a = sa.attn
            x = x + a.attend(a.heads(a.q, h), a.heads(a.k, h), a.heads(a.v, h), bias)
            x = ff(x)
        return self.encoder.final_layer_norm(x)

    def start_cache(self, enc_out: Tensor, attention_mask: Tensor | None = None) -> Seq2SeqCache:
        """Cross-attention keys / values of every decoder layer from the encoder output, computed once."""
        B, S, _ = enc_out.shape
        enc_bias = (self._mask_bias(attention_mask, enc_out.dtype) if attention_mask is not None
                    else torch.zeros(B, 1, 1, S, dtype=enc_out.dtype, device=enc_out.device))
        cross = []
        for blk in self.decoder.block:
            a = blk.layer[1].attn
            cross.append((a.heads(a.k, enc_out), a.heads(a.v, enc_out)))
        return Seq2SeqCache(enc_bias, cross, [None] * len(self.decoder.block))

    def decode(self, decoder_input_ids: Tensor, cache: Seq2SeqCache, *, advance: bool = True) -> Tensor:
        """Logits (B, T, vocab) for decoder tokens at positions ``cache.length ..``; with ``advance`` their
        self-attention keys / values are appended to the cache (the decoder sees them at later steps)."""
        x = self.shared(decoder_input_ids)
        T, past = x.shape[1], cache.length
        bias = self._position_bias(self.decoder, T, past + T, past, decoder=True).to(x.dtype)
        causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        bias = bias.masked_fill(~causal, torch.finfo(x.dtype).min)
        for i, blk in enumerate(self.decoder.block):
            sa, ca, ff = blk.layer
            h = sa.layer_norm(x)
            a = sa.attn
            k, v = a.heads(a.k, h), a.heads(a.v, h)
            if cache.self_kv[i] is not None:
                pk, pv = cache.self_kv[i]
                k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            if advance:
                cache.self_kv[i] = (k, v)
            x = x + a.attend(a.heads(a.q, h), k, v, bias)
            h = ca.layer_norm(x)
            ck, cv = cache.cross_kv[i]
            x = x + ca.attn.attend(ca.attn.heads(ca.attn.q, h), ck, cv, cache.enc_bias)
            x = ff(x)
        if advance:
            cache.length += T
        x = self.decoder.final_layer_norm(x)
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model ** -0.5
        return self.lm_head(x)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, T, vocab) (training, scoring); no cache kept."""
        cache = self.start_cache(self.encode(input_ids, attention_mask), attention_mask)
        return self.decode(decoder_input_ids, cache, advance=False)

    def shift_right(self, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """Decoder inputs for ``labels`` (B, T): decoder_start_token_id, then labels[:, :-1] (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], 1)
        return shifted.masked_fill(shifted == ignore_index, self.config.pad_token_id)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 use_cache: bool = True) -> list[list[int]]:
        """Greedy (``temperature`` 0) or sampled continuations, one list of ids per row, each ending at (and
        including) the first eos. ``use_cache=False`` re-runs the whole decoder every step (the reference the
        tests compare the cached path with)."""
        eos = self.config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        enc = self.encode(input_ids, attention_mask)
        B = input_ids.shape[0]
        g = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
        cur = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        seqs = cur
        cache = self.start_cache(enc, attention_mask)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out: list[list[int]] = [[] for _ in range(B)]
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self.decode(cur, cache)[:, -1].float()
            else:
                logits = self.decode(seqs, self.start_cache(enc, attention_mask), advance=False)[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                if top_p < 1.0:
                    sp, si = probs.sort(-1, descending=True)
                    keep = sp.cumsum(-1) - sp < top_p
                    probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
                nxt = torch.multinomial(probs, 1, generator=g)[:, 0]
            nxt = nxt.masked_fill(done, self.config.pad_token_id)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt[b]))
                    if int(nxt[b]) in stops:
                        done[b] = True
            cur = nxt[:, None]
            seqs = torch.cat([seqs, cur], 1)
            if bool(done.all()):
                break
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


# ---------------------------------------------------------------------------------------------- I/O
_TIED_INPUTS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def is_seq2seq_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a T5-family ``config.json`` (what ``lmstack generate`` dispatches on)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        d = read_json(p, error=CheckpointError)
    except CheckpointError:
        return False
    return isinstance(d, dict) and d.get("model_type") in SEQ2SEQ_MODEL_TYPES


def load_seq2seq(path: str | Path, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None) -> Seq2Seq:
    """Load a T5 / mT5 / Flan-T5 HF directory (key copy from safetensors), in eval mode. A file with its own
    ``lm_head.weight`` stays untied (and unscaled, unless its config says otherwise)."""
    from lmstack.model.hf_io import read_state_dict
    from lmstack.utils.device import resolve_device, resolve_dtype

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory not found")
    cfg = Seq2SeqConfig.from_hf(path)
    sd = read_state_dict(path)
    for k in _TIED_INPUTS:
        sd.pop(k, None)
    if "lm_head.weight" in sd and cfg.tie_word_embeddings and not torch.equal(sd["lm_head.weight"], sd.get(
            "shared.weight", sd["lm_head.weight"])):
        cfg.tie_word_embeddings = False
    dev = resolve_device(device)
    dt = resolve_dtype(dtype if dtype is not None else "auto", dev)
    with torch.device("meta"):
        model = Seq2Seq(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        want.pop("lm_head.weight", None)
    missing = [k for k in want if k not in sd]
    unexpected = sorted(k for k in sd if k not in want)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{path}: weights do not match config.json ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected, e.g. {what})")
    for k, t in sd.items():
        if tuple(t.shape) != want[k]:
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)} but config.json implies {want[k]}")
        sd[k] = t.to(device=dev, dtype=dt)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["shared.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    model.tie_weights()
    cfg.torch_dtype = str(dt).removeprefix("torch.")
    return model.eval()


def save_seq2seq(model: Seq2Seq, path: str | Path, *, tokenizer_dir: str | Path | None = None,
                 state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` (+ tokenizer files)."""
    from lmstack.model.hf_io import _save_safetensors, copy_tokenizer
    from lmstack.utils.io import atomic_write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in sd.items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    _save_safetensors(tensors, path / "model.safetensors")
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write_json(path / "config.json", hf)
    atomic_write_json(path / "generation_config.json", {
        "decoder_start_token_id": cfg.decoder_start_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "do_sample": False})
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path)
    return path
