"""A CLIP-style dual encoder: a small CNN for images, lmstack's BERT-style text encoder for captions.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language Supervision", Figure 3):
both towers project into one space, embeddings are L2-normalised, the logits are ``exp(t) * I @ T^T`` with a
learned log-temperature ``t`` (initialised to log(1/0.07), clamped at log(100)), and the loss is the mean of
the cross-entropies over rows (image -> text) and columns (text -> image) with the diagonal as the target --
the symmetric InfoNCE loss (van den Oord et al. 2018). tests/test_mm_clip.py checks :func:`clip_loss` against
a per-row float64 loop and against ``transformers``' ``clip_loss``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import CheckpointError, ConfigError
from lmstack.model.encoder import Encoder, EncoderConfig

MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class ClipConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)  # one stride-2 conv block per entry
    embed_dim: int = 48  # the shared space
    vocab_size: int = 400
    text_hidden: int = 48
    text_layers: int = 1
    text_heads: int = 4
    text_intermediate: int = 96
    max_length: int = 24
    pad_token_id: int = 0
    init_temperature: float = 0.07

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.image_size < 8 or self.image_size % (2 ** len(self.channels)):
            raise ConfigError(f"clip.image_size {self.image_size} must be >= 8 and divisible by "
                              f"2**len(channels) = {2 ** len(self.channels)}")
        if self.embed_dim < 1 or not self.channels:
            raise ConfigError("clip.embed_dim must be >= 1 and clip.channels non-empty")
        if not 0 < self.init_temperature < 1:
            raise ConfigError(f"clip.init_temperature must be in (0, 1), got {self.init_temperature}")

    def text_config(self) -> EncoderConfig:
        return EncoderConfig(vocab_size=self.vocab_size, hidden_size=self.text_hidden,
                             num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
                             intermediate_size=self.text_intermediate, max_position_embeddings=self.max_length,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             pad_token_id=self.pad_token_id, head="base")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "ClipConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if d.get("model_type") != "lmstack_clip" or unknown:
            raise CheckpointError(f"{where}: not an lmstack CLIP config (model_type {d.get('model_type')!r}"
                                  + (f", unknown keys {unknown}" if unknown else "") + ")")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "lmstack_clip", **asdict(self), "channels": list(self.channels)}


class ImageEncoder(nn.Module):
    """conv3x3(stride 2) -> BatchNorm -> GELU per block, global average pool, linear projection.
    (B, 3, S, S) float in [0, 1] -> (B, embed_dim)."""

    def __init__(self, c: ClipConfig):
        super().__init__()
        blocks, cin = [], 3
        for cout in c.channels:
            blocks += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.GELU()]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Linear(cin, c.embed_dim)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks((x - self.mean) / 0.25)  # (B, C, S / 2**n, S / 2**n)
        return self.proj(h.mean((2, 3)))


class Clip(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.config = cfg
        self.visual = ImageEncoder(cfg)
        self.text = Encoder(cfg.text_config())
        self.text_proj = nn.Linear(cfg.text_hidden, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> unit vectors (B, D)."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ids and mask -> unit vectors (B, D): the mean-pooled text encoder, projected."""
        return F.normalize(self.text_proj(self.text.embed(input_ids, attention_mask)), dim=-1)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Image-by-text logits (B, B): exp(logit_scale) * I @ T^T."""
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return scale * self.encode_image(images) @ self.encode_text(input_ids, attention_mask).T


def clip_loss(logits_per_image: Tensor) -> Tensor:
    """Symmetric InfoNCE over a (B, B) logit matrix whose diagonal holds the matching pairs."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2


def recall_at_k(sim: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for a (N, N) query-by-candidate similarity matrix whose right answer is the diagonal: the share of
    rows whose diagonal entry ranks among the k largest (ties count against it)."""
    right = sim.diagonal()[:, None]
    rank = (sim > right).sum(1) + ((sim == right).sum(1) - 1)  # 0 = first
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


def images_to_tensor(images) -> Tensor:
    """(N, S, S, 3) uint8 array -> (N, 3, S, S) float in [0, 1]."""
    t = torch.as_tensor(images)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ConfigError(f"images must be (N, S, S, 3) RGB, got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float() / 255.0


def save_clip(model: Clip, out: str | Path, tokenizer_dir: str | Path) -> Path:
    from lmstack.model.hf_io import _save_safetensors, copy_tokenizer
    from lmstack.utils.io import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      out / "model.safetensors")
    atomic_write_json(out / "config.json", model.config.to_dict())
    copy_tokenizer(tokenizer_dir, out)
    return out


def load_clip(path: str | Path) -> Clip:
    from lmstack.model.hf_io import read_state_dict
    from lmstack.utils.io import read_json

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (train one with `lmstack clip train --out DIR`)")
    cfg = ClipConfig.from_dict(read_json(path / "config.json", error=CheckpointError), str(path / "config.json"))
    model = Clip(cfg)
    sd = read_state_dict(path)
    want = model.state_dict()
    if set(sd) != set(want) or any(tuple(sd[k].shape) != tuple(want[k].shape) for k in want):
        raise CheckpointError(f"{path}: weights do not match config.json")
    model.load_state_dict(sd)
    return model.eval()
