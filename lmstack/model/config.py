"""ModelConfig: one dataclass describes every supported decoder (litgpt's "variants as data").

Llama, Qwen2, Qwen3, Mistral, Mixtral, Qwen2-MoE and Qwen3-MoE are rows of values read from a Hugging Face
``config.json`` (:meth:`ModelConfig.from_hf`) and written back (:meth:`ModelConfig.to_hf`). Switches are fields:
``attention_bias`` (q/k/v bias), ``attention_out_bias`` (o_proj bias, Llama / Qwen3 ``attention_bias``),
``mlp_bias``, ``qk_norm`` (Qwen3 per-head RMSNorm), ``sliding_window`` (Mistral, or every layer of a
Qwen2 with ``use_sliding_window``), ``rope_scaling`` (linear, Llama-3, YaRN, dynamic NTK),
``num_experts`` > 0 (sparse mixture of experts, :mod:`lmstack.model.moe`), ``tie_word_embeddings``.

Every ``config.json`` field that changes the numbers is either honoured or refused here, with one line
(:func:`check_hf_config`); ``lmstack info`` and loading run the same check (tests/test_model_sweep.py sets each
field of each architecture in the installed ``transformers`` to a non-default value and checks exactly that).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lmstack.errors import CheckpointError, ConfigError
from lmstack.utils.io import read_json

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "gemma3_text")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
# Family defaults where config.json may omit a key (the defaults of the transformers config classes).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qwen2": dict(tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qwen3": dict(tie_word_embeddings=False, rms_norm_eps=1e-6),
    "mistral": dict(tie_word_embeddings=False, rms_norm_eps=1e-6),
    "mixtral": dict(tie_word_embeddings=False, rms_norm_eps=1e-5, num_experts_per_tok=2, num_experts=8),
    "qwen2_moe": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, num_experts_per_tok=4, num_experts=60,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, norm_topk_prob=False),
    "qwen3_moe": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, num_experts_per_tok=8, num_experts=128,
                      moe_intermediate_size=768, norm_topk_prob=False),
    # Gemma3TextConfig's defaults (transformers 5)
    "gemma3_text": dict(tie_word_embeddings=True, rms_norm_eps=1e-6, vocab_size=262_208, hidden_size=2304,
                        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, max_position_embeddings=131_072, query_pre_attn_scalar=256,
                        sliding_window=4096, bos_token_id=2, eos_token_id=1, pad_token_id=0),
}
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


def read_hf_config(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the HF ``config.json`` as a dict, where it came from for messages) of a path, a model directory or an
    already-parsed dict; a missing file or a non-object is a :class:`CheckpointError` with one line."""
    if not isinstance(source, (str, Path)):
        return dict(source), "config"
    p = Path(source)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{p}: config.json not found (is this a Hugging Face model directory?)")
    d = read_json(p, error=CheckpointError)
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    return d, str(p)


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
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear" | "yarn" | "dynamic", ...}
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    attention_out_bias: bool = False  # o_proj bias (Llama / Qwen3 with attention_bias: true)
    mlp_bias: bool = False  # gate/up/down bias (Llama mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # every layer attends to at most this many previous tokens
    # ---- sparse mixture of experts (lmstack/model/moe.py); num_experts == 0: a dense SwiGLU MLP
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k
    moe_intermediate_size: int | None = None  # per expert; defaults to intermediate_size (Mixtral)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert with a sigmoid gate
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1 (Mixtral: always)
    decoder_sparse_step: int = 1  # layer i is sparse iff (i + 1) % step == 0 and i not in mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001  # load-balancing loss weight in training (Switch / Mixtral)
    router_z_loss_coef: float = 0.0  # router z-loss weight in training (ST-MoE)
    router_jitter_noise: float = 0.0  # multiplicative input noise in training (Mixtral)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    # ---- Gemma 3 (model_type gemma3_text): (1 + w) RMSNorms before and after attention and MLP, q/k norms,
    # embeddings scaled by sqrt(hidden), a GELU-tanh gated MLP, sliding-window and global layers
    hidden_act: str = "silu"  # "gelu_pytorch_tanh" / "gelu" for Gemma (silu: SwiGLU for the other families)
    layer_types: list[str] | None = None  # per layer "sliding_attention" / "full_attention"; None: all alike
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3 rope_local_base_freq)
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar ** -0.5 (else head_dim)
    final_logit_softcapping: float | None = None  # logits = c * tanh(logits / c)
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we keep but do not use

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f'model_type "{self.model_type}" is not supported; supported: {", ".join(SUPPORTED_MODEL_TYPES)}'
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                              f"num_experts ({self.num_experts})")
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        check_rope(self.rope_scaling, self.head_dim)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            if bad:
                raise ConfigError(f"layer_types has {bad[0]!r}; supported: sliding_attention, full_attention")
        if self.is_gemma and self.hidden_act not in GEMMA_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported for Gemma; supported: "
                              f"{', '.join(GEMMA_ACTIVATIONS)}")
        if not self.is_gemma and self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only silu / SwiGLU)")

    @property
    def is_gemma(self) -> bool:
        """Gemma 3's layer layout: (1 + w) norms before and after attention and MLP, scaled embeddings."""
        return self.model_type == "gemma3_text"

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i`` (None: full causal attention)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @property
    def attention_window(self) -> int | None | tuple[int | None, ...]:
        """What attention contexts take as ``sliding_window``: one window for every layer (or None), or a tuple
        with each layer's window where layers differ (Gemma 3's sliding / global pattern)."""
        if self.layer_types is None:
            return self.sliding_window
        wins = tuple(self.layer_window(i) for i in range(self.num_hidden_layers))
        return wins[0] if len(set(wins)) == 1 else wins

    # ------------------------------------------------------------------ sizes
    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` has a sparse MoE block (Qwen2-MoE's ``decoder_sparse_step`` rule)."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def num_parameters(self, include_embeddings: bool = True, active_only: bool = False) -> int:
        """All parameters, or with ``active_only`` those one token uses (top-k of the routed experts)."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q = h * self.num_attention_heads * d
        kv = 2 * h * self.num_key_value_heads * d
        o = self.num_attention_heads * d * h
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * d if self.attention_bias else 0
        bias += h if self.attention_out_bias else 0
        norms = (4 if self.is_gemma else 2) * h + (2 * d if self.qk_norm else 0)
        dense = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        ei = self.moe_intermediate_size
        n_routed = self.num_experts_per_tok if active_only else self.num_experts
        sparse = n_routed * 3 * h * ei + self.num_experts * h
        if self.shared_expert_intermediate_size:
            sparse += 3 * h * self.shared_expert_intermediate_size + h
        total = h
        for layer in range(self.num_hidden_layers):
            total += q + kv + o + bias + norms + (sparse if self.is_moe_layer(layer) else dense)
        emb = self.vocab_size * h
        if include_embeddings:
            total += emb if self.tie_word_embeddings else 2 * emb
        return total

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "ModelConfig":
        """Build from a HF ``config.json`` (path, model directory, or already-parsed dict).

        Refuses, with one line naming the field, any value lmstack would otherwise compute differently from
        ``transformers`` (see :func:`check_hf_config`)."""
        d, where = read_hf_config(source)
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            hint = " (an encoder: use lmstack.model.load_encoder or `lmstack classify`)" if mt == "bert" else ""
            if mt == "gemma3":
                hint = " (the multimodal Gemma 3; lmstack loads the text decoder, model_type gemma3_text)"
            if mt in ("t5", "mt5"):
                hint = (" (an encoder-decoder: `lmstack generate` runs it, `lmstack seq2seq train` fine-tunes it, "
                        "lmstack.model.seq2seq.load_seq2seq loads it)")
            raise CheckpointError(
                f'{where} has model_type "{mt}"; supported: {", ".join(SUPPORTED_MODEL_TYPES)}{hint}'
            )
        try:
            if mt == "gemma3_text":
                return cls(**_gemma3_kwargs(d, where))
            return cls(**_hf_to_kwargs(d, mt, where))
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.AutoConfig`` reads for this model_type."""
        mt = self.model_type
        if mt == "gemma3_text":
            return _gemma3_to_hf(self)
        rope = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[mt]],
            "model_type": mt,
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
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "attention_dropout": 0.0,
        }
        if mt in ("llama", "qwen3", "qwen3_moe"):
            if self.attention_bias != self.attention_out_bias:
                raise ConfigError(f"{mt} has one attention_bias for q/k/v and o_proj; "
                                  f"got attention_bias={self.attention_bias}, attention_out_bias={self.attention_out_bias}")
            d["attention_bias"] = self.attention_bias
        if mt == "llama":
            d["mlp_bias"] = self.mlp_bias
        if mt == "qwen2_moe":
            d["qkv_bias"] = self.attention_bias
        if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
            # every layer slides (max_window_layers = 0) or none does
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = 0 if self.sliding_window is not None else self.num_hidden_layers
            if mt != "qwen3_moe":
                d["layer_types"] = ["sliding_attention" if self.sliding_window is not None else "full_attention"
                                    ] * self.num_hidden_layers
        if mt in ("mistral", "mixtral"):
            d["sliding_window"] = self.sliding_window
        if mt == "mixtral":
            d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     router_aux_loss_coef=self.router_aux_loss_coef, router_jitter_noise=self.router_jitter_noise)
        if mt in ("qwen2_moe", "qwen3_moe"):
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                     router_aux_loss_coef=self.router_aux_loss_coef)
        if mt == "qwen2_moe":
            d["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        if self.router_z_loss_coef:
            d["router_z_loss_coef"] = self.router_z_loss_coef
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    def replace(self, **kw: Any) -> "ModelConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_rope(rs: dict[str, Any] | None, head_dim: int) -> None:
    """Refuse a RoPE scaling lmstack does not compute (one line naming the type and the supported ones)."""
    if not rs:
        return
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(rs.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",), "dynamic": ("factor",)}.get(kind, ())
    missing = [k for k in need if rs.get(k) is None]
    if missing:
        raise ConfigError(f"rope type {kind!r} needs {', '.join(missing)} in rope_scaling / rope_parameters")


def _layer_types(d: dict[str, Any], mt: str, n_layers: int) -> list[str]:
    """Which layers slide, by each family's rule in transformers (explicit ``layer_types`` wins)."""
    if isinstance(d.get("layer_types"), list) and mt in ("qwen2", "qwen3", "qwen2_moe"):
        return list(d["layer_types"])
    use = bool(d.get("use_sliding_window", False))
    window = d.get("sliding_window", 4096)
    mwl = d.get("max_window_layers", 28)
    if mt in ("qwen2", "qwen3"):
        return ["sliding_attention" if use and window is not None and i >= mwl else "full_attention"
                for i in range(n_layers)]
    if mt == "qwen2_moe":  # transformers: odd layers below max_window_layers slide
        return ["sliding_attention" if use and (i + 1) % 2 and i < mwl else "full_attention"
                for i in range(n_layers)]
    if mt == "qwen3_moe":
        return ["sliding_attention" if use and window is not None else "full_attention"] * n_layers
    if mt in ("mistral", "mixtral"):
        return ["sliding_attention" if window is not None else "full_attention"] * n_layers
    return ["full_attention"] * n_layers


def _hf_to_kwargs(d: dict[str, Any], mt: str, where: str) -> dict[str, Any]:
    """``config.json`` -> ModelConfig keyword arguments, refusing what lmstack would compute differently."""
    fam = _FAMILY_DEFAULTS[mt]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
    known = {f.name for f in fields(ModelConfig)} - {
        "extra", "qk_norm", "attention_bias", "attention_out_bias", "mlp_bias", "sliding_window", "num_experts",
        "rope_scaling", "rope_theta", "tie_word_embeddings", "rms_norm_eps", "num_experts_per_tok",
        "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "hidden_act", "layer_types",
        "rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"}
    kw: dict[str, Any] = {k: d[k] for k in known if k in d}
    if kw.get("num_key_value_heads") is None:
        kw["num_key_value_heads"] = d.get("num_attention_heads", ModelConfig.num_attention_heads)
    if kw.get("head_dim") is None:
        kw.pop("head_dim", None)
        if mt == "qwen3" and "head_dim" not in d:
            kw["head_dim"] = 128  # Qwen3Config's default
    for k in ("tie_word_embeddings", "rms_norm_eps", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob"):
        v = d.get(k, fam.get(k))
        if v is not None:
            kw[k] = v
    if kw.get("mlp_only_layers") is None:
        kw["mlp_only_layers"] = []
    # ---- rope: transformers 5 moves rope_theta / rope_scaling into `rope_parameters`
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None
    rs = d.get("rope_scaling") if isinstance(d.get("rope_scaling"), dict) else None
    if rp is not None and rp and all(isinstance(v, dict) for v in rp.values()):
        raise ConfigError("rope_parameters per layer type (nested) is not supported")
    theta = (rp or {}).get("rope_theta", d.get("rope_theta"))
    kw["rope_theta"] = float(theta if theta is not None else 10000.0)
    scaling = dict(rp) if rp and rp.get("rope_type", rp.get("type", "default")) != "default" else (
        dict(rs) if rs else None)
    if scaling is not None:
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        else:
            scaling["rope_type"] = kind
            scaling.pop("type", None)
            if kind in ("llama3", "yarn"):  # transformers' standardize_rope_params
                if d.get("original_max_position_embeddings") is not None:
                    scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
                scaling.setdefault("original_max_position_embeddings",
                                   d.get("max_position_embeddings", ModelConfig.max_position_embeddings))
    if float(d.get("partial_rotary_factor", (rp or {}).get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    kw["rope_scaling"] = scaling
    # ---- biases and norms per family
    if mt == "qwen2":
        kw["attention_bias"] = True  # transformers' Qwen2Attention always has q/k/v bias
    elif mt == "qwen2_moe":
        kw["attention_bias"] = bool(d.get("qkv_bias", True))
    elif mt in ("llama", "qwen3", "qwen3_moe"):
        kw["attention_bias"] = kw["attention_out_bias"] = bool(d.get("attention_bias", False))
    kw["mlp_bias"] = bool(d.get("mlp_bias", False)) if mt == "llama" else False
    kw["qk_norm"] = mt in ("qwen3", "qwen3_moe")
    # ---- sliding window: one window for all layers, or none
    n_layers = int(d.get("num_hidden_layers", ModelConfig.num_hidden_layers))
    types = _layer_types(d, mt, n_layers)
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ConfigError(f"layer_types has {bad[0]!r}; supported: sliding_attention, full_attention")
    window = d.get("sliding_window", 4096 if mt != "mixtral" else None)
    if mt == "qwen2_moe" and not window:
        window = None
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not all(sliding) and window is not None:
        n = sum(sliding)
        raise ConfigError(
            f"{n} of {n_layers} layers use a sliding window and the rest full attention "
            f"(use_sliding_window / max_window_layers / layer_types); lmstack runs one attention type for all "
            "layers: set max_window_layers to 0 (all slide) or use_sliding_window to false (none) if the model was "
            "trained that way")
    kw["sliding_window"] = int(window) if all(sliding) and window is not None and sliding else None
    if mt in ("mistral", "mixtral") and window is not None:
        kw["sliding_window"] = int(window)
    # ---- mixture of experts
    if mt == "mixtral":
        kw["num_experts"] = int(d.get("num_local_experts", fam["num_experts"]))
        kw["norm_topk_prob"] = True
        kw["moe_intermediate_size"] = kw.get("intermediate_size", ModelConfig.intermediate_size)
    elif mt in ("qwen2_moe", "qwen3_moe"):
        n = d.get("num_experts", d.get("num_local_experts"))  # Qwen3-MoE saves num_local_experts
        kw["num_experts"] = int(n if n is not None else fam["num_experts"])
        if mt == "qwen3_moe":
            kw["shared_expert_intermediate_size"] = 0
        if kw["num_experts"] == 0:
            raise ConfigError("num_experts 0 in an MoE family is not supported (use the dense family)")
    else:
        kw.pop("decoder_sparse_step", None)
        kw.pop("mlp_only_layers", None)
        for k in ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob"):
            kw.pop(k, None)
    dtype = d.get("dtype") or d.get("torch_dtype")  # transformers 5 writes "dtype"
    kw["torch_dtype"] = dtype if isinstance(dtype, str) else "float32"
    used = set(kw) | {"rope_parameters", "rope_scaling", "num_local_experts", "qkv_bias", "attention_bias",
                      "mlp_bias", "hidden_act", "partial_rotary_factor", "original_max_position_embeddings",
                      "sliding_window", "num_experts", "dtype", "torch_dtype"}
    kw["extra"] = {k: v for k, v in d.items() if k not in used}
    return kw


def _gemma3_kwargs(d: dict[str, Any], where: str) -> dict[str, Any]:
    """A Gemma 3 text ``config.json`` (``Gemma3TextConfig``, transformers 4.50+ / 5) -> ModelConfig keywords."""
    fam = _FAMILY_DEFAULTS["gemma3_text"]

    def get(k: str) -> Any:
        return d[k] if d.get(k) is not None else fam.get(k)

    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention (EmbeddingGemma) is not supported; lmstack runs the causal "
                          "Gemma 3 decoder")
    if d.get("attn_logit_softcapping") is not None:
        raise ConfigError("attn_logit_softcapping (Gemma 2 style) is not supported; Gemma 3 checkpoints set it "
                          "to null")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    n_layers = int(get("num_hidden_layers"))
    types = d.get("layer_types")
    if not isinstance(types, list):
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    # rope: transformers 5 nests it per layer type; older files have rope_theta / rope_local_base_freq /
    # rope_scaling (the global layers' scaling)
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    full = dict(rp.get("full_attention") or {})
    local = dict(rp.get("sliding_attention") or {})
    if not full and isinstance(d.get("rope_scaling"), dict):
        full = dict(d["rope_scaling"])
    theta = full.pop("rope_theta", d.get("rope_theta", 1_000_000.0))
    local_theta = local.pop("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ConfigError(f"rope type {local.get('rope_type', local.get('type'))!r} on the sliding layers is not "
                          "supported (Gemma 3 uses plain RoPE there)")
    kind = full.get("rope_type", full.get("type", "default"))
    scaling = None
    if kind != "default":
        scaling = {k: v for k, v in full.items() if k != "type"}
        scaling["rope_type"] = kind
        if kind in ("llama3", "yarn"):
            scaling.setdefault("original_max_position_embeddings", int(get("max_position_embeddings")))
    if float(d.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    window = get("sliding_window")
    bias = bool(d.get("attention_bias", False))
    dtype = d.get("dtype") or d.get("torch_dtype")
    kw: dict[str, Any] = dict(
        model_type="gemma3_text", vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")), num_hidden_layers=n_layers,
        num_attention_heads=int(get("num_attention_heads")),
        num_key_value_heads=int(get("num_key_value_heads") or get("num_attention_heads")),
        head_dim=int(get("head_dim")), rms_norm_eps=float(get("rms_norm_eps")), rope_theta=float(theta),
        rope_scaling=scaling, rope_local_theta=float(local_theta), attention_bias=bias, attention_out_bias=bias,
        qk_norm=True, tie_word_embeddings=bool(get("tie_word_embeddings")),
        max_position_embeddings=int(get("max_position_embeddings")),
        sliding_window=int(window) if window is not None and "sliding_attention" in types else None,
        layer_types=list(types), hidden_act=act, query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
        final_logit_softcapping=(float(d["final_logit_softcapping"]) if d.get("final_logit_softcapping") is not None
                                 else None),
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"), pad_token_id=get("pad_token_id"),
        torch_dtype=dtype if isinstance(dtype, str) else "float32",
        initializer_range=float(d.get("initializer_range", 0.02)),
    )
    used = set(kw) | {"rope_parameters", "rope_scaling", "rope_local_base_freq", "hidden_activation", "dtype",
                      "sliding_window_pattern", "_sliding_window_pattern", "use_bidirectional_attention",
                      "attn_logit_softcapping", "partial_rotary_factor", "architectures"}
    kw["extra"] = {k: v for k, v in d.items() if k not in used}
    return kw


def _gemma3_to_hf(cfg: "ModelConfig") -> dict[str, Any]:
    if cfg.attention_bias != cfg.attention_out_bias:
        raise ConfigError("gemma3_text has one attention_bias for q/k/v and o_proj")
    types = cfg.layer_types or ["sliding_attention" if cfg.sliding_window is not None else "full_attention"
                                ] * cfg.num_hidden_layers
    full = {**(cfg.rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or 10_000.0}
    d: dict[str, Any] = {
        "architectures": [_ARCHITECTURES["gemma3_text"]], "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "hidden_activation": cfg.hidden_act, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"full_attention": full, "sliding_attention": local},
        "rope_theta": cfg.rope_theta, "rope_local_base_freq": cfg.rope_local_theta or 10_000.0,
        "rope_scaling": cfg.rope_scaling, "attention_bias": cfg.attention_bias, "attention_dropout": 0.0,
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar or cfg.head_dim),  # an int in Gemma3TextConfig
        "sliding_window": cfg.sliding_window if cfg.sliding_window is not None else 4096,
        "layer_types": list(types), "final_logit_softcapping": cfg.final_logit_softcapping,
        "attn_logit_softcapping": None, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.torch_dtype, "use_bidirectional_attention": False,
    }
    for k, v in cfg.extra.items():
        d.setdefault(k, v)
    return d


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
    # Sparse MoE (Mixtral layout): 8 experts, top-2; ~22M parameters, ~8M active per token — the same active
    # FFN width as `tiny`'s dense 1024 (benchmarks/moe.py compares the two).
    "moe": dict(model_type="mixtral", vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, num_experts=8,
                num_experts_per_tok=2, tie_word_embeddings=True, router_aux_loss_coef=0.01,
                router_z_loss_coef=0.001),
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
