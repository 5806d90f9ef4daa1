"""ModelConfig: one dataclass describes every supported decoder (litgpt's "variants as data").

Llama, Qwen2, Qwen3 and Mistral are rows of values read from a Hugging Face ``config.json``
(:meth:`ModelConfig.from_hf`) and written back (:meth:`ModelConfig.to_hf`). Switches are fields:
``attention_bias`` (Qwen2 q/k/v bias), ``qk_norm`` (Qwen3 per-head RMSNorm), ``sliding_window`` (Mistral),
``rope_scaling`` (Llama-3 long-context), ``tie_word_embeddings``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lmstack.errors import CheckpointError, ConfigError
from lmstack.utils.io import read_json

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": 8, ...}
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we keep but do not use

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f'model_type "{self.model_type}" is not supported; supported: {", ".join(SUPPORTED_MODEL_TYPES)}'
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self, include_embeddings: bool = True) -> int:
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q = h * self.num_attention_heads * d
        kv = 2 * h * self.num_key_value_heads * d
        o = self.num_attention_heads * d * h
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * d if self.attention_bias else 0
        norms = 2 * h + (2 * d if self.qk_norm else 0)
        per_layer = q + kv + o + bias + 3 * h * i + norms
        emb = self.vocab_size * h
        total = self.num_hidden_layers * per_layer + h
        if include_embeddings:
            total += emb if self.tie_word_embeddings else 2 * emb
        return total

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "ModelConfig":
        """Build from a HF ``config.json`` (path, model directory, or already-parsed dict)."""
        where = "config"
        if isinstance(source, (str, Path)):
            p = Path(source)
            if p.is_dir():
                p = p / "config.json"
            where = str(p)
            if not p.is_file():
                raise CheckpointError(f"{p}: config.json not found (is this a Hugging Face model directory?)")
            d = read_json(p, error=CheckpointError)
        else:
            d = dict(source)
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f'{where} has model_type "{mt}"; supported: {", ".join(SUPPORTED_MODEL_TYPES)}'
            )
        known = {f.name for f in fields(cls)} - {"extra", "qk_norm", "attention_bias"}
        kw: dict[str, Any] = {k: d[k] for k in known if k in d}
        # rope: transformers 5 moves rope_theta / rope_scaling into `rope_parameters`
        rp = d.get("rope_parameters")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            if rp.get("rope_type", "default") != "default":
                kw["rope_scaling"] = dict(rp)
        if kw.get("rope_scaling") and kw["rope_scaling"].get("rope_type", kw["rope_scaling"].get("type")) in (None, "default"):
            kw["rope_scaling"] = None
        kw["attention_bias"] = bool(d.get("attention_bias", mt == "qwen2"))
        kw["qk_norm"] = mt == "qwen3"
        if mt == "qwen2" or mt == "qwen3":
            if not d.get("use_sliding_window", False):
                kw["sliding_window"] = None
        if mt == "llama":
            kw["sliding_window"] = None
        if mt == "mistral" and "tie_word_embeddings" not in d:
            kw["tie_word_embeddings"] = False
        if mt == "llama" and "tie_word_embeddings" not in d:
            kw["tie_word_embeddings"] = False
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported (only silu / SwiGLU)")
        dtype = d.get("dtype") or d.get("torch_dtype")  # transformers 5 writes "dtype"
        kw["torch_dtype"] = dtype if isinstance(dtype, str) else "float32"
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        kw["extra"] = {k: v for k, v in d.items() if k not in known and k not in ("rope_parameters",)}
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.AutoConfig`` reads for this model_type."""
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "attention_dropout": 0.0,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = self.num_hidden_layers
        if self.model_type == "qwen3":
            d["attention_bias"] = self.attention_bias
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    def replace(self, **kw: Any) -> "ModelConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Named presets: CPU-sized models to train from scratch, and real shapes (random weights) for benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    # ~3.9M parameters (2.4M non-embedding + 1.6M tied embedding), 2.7x fewer FLOPs per token than `tiny`:
    # in the quickstart's 15 CPU-minutes it sees 2.5x the tokens and ends far better (docs/quickstart.md).
    "micro": dict(vocab_size=8192, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024),
    # ~10M parameters (8.3M non-embedding + 2.1M tied embedding): trains in minutes on a 2-core CPU.
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    # ~30M parameters.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    # The shape of Qwen2.5-0.5B (random weights): benchmarks and memory planning.
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True,
                         tie_word_embeddings=True, max_position_embeddings=32768),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
