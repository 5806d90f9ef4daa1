"""Train, evaluate and use the CLIP-style model (setup -> loop -> save, then metrics).

``train_clip`` renders the synthetic pairs (:mod:`lmstack.mm.shapes`), trains a byte-level BPE on the captions,
optimises the symmetric InfoNCE loss with AdamW and writes ``OUT/`` (config.json, model.safetensors, tokenizer,
metrics.json). ``evaluate_clip`` scores freshly rendered held-out pairs: image->text and text->image recall@k
(every caption unique, so one right answer) and zero-shot classification of colour, object and position with
prompt ensembling (Radford et al. 2021, 3.1.4: the class embedding is the mean over prompts that name it).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lmstack.errors import ConfigError, DataError
from lmstack.mm import shapes
from lmstack.mm.clip import Clip, ClipConfig, clip_loss, images_to_tensor, load_clip, recall_at_k, save_clip
from lmstack.utils.io import atomic_write_json

MAX_IMAGE_BYTES = 20 << 20  # one image file to embed
MAX_IMAGES = 100_000


@dataclass
class ClipTrainConfig:
    out: str = "runs/clip"
    train_pairs: int = 2000
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    langs: tuple[str, ...] = ("en", "zh")
    model: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        for k in ("train_pairs", "steps", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"clip.{k} must be >= 1, got {getattr(self, k)}")
        if self.batch_size < 2:
            raise ConfigError("clip.batch_size must be >= 2 (a contrastive batch needs negatives)")
        bad = sorted(set(self.langs) - {"en", "zh"})
        if bad or not self.langs:
            raise ConfigError(f"clip.langs {list(self.langs)}: choose from en, zh")


class TextBatcher:
    """A trained tokenizer directory -> (ids, mask) batches padded to the longest caption (capped)."""

    def __init__(self, tok_dir: str | Path, max_length: int, pad_id: int):
        from lmstack.tokenizer import Tokenizer

        self.tok, self.max_length, self.pad_id = Tokenizer.from_dir(tok_dir), max_length, pad_id

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from lmstack.model.classify import encode_batch

        return encode_batch(self.tok, list(texts), self.max_length, self.pad_id)


def train_clip(cfg: ClipTrainConfig) -> dict[str, Any]:
    """Train on rendered pairs and write the model directory; returns (and writes) metrics.json."""
    from lmstack.model.classify import _train_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    images, items = shapes.make_pairs(cfg.train_pairs, seed=cfg.seed, size=cfg.model.image_size, langs=cfg.langs)
    x = images_to_tensor(images)
    captions = [it.caption for it in items]
    out = Path(cfg.out)
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        # the tokenizer sees every caption the generator can produce (the vocabulary of the task, not the test set)
        tok = _train_tokenizer([it.caption for it in shapes.all_items(cfg.langs)], cfg.model.vocab_size, Path(tmp),
                               cfg.model.max_length)
        mcfg = ClipConfig(**{**asdict(cfg.model), "vocab_size": tok.vocab_size,
                             "pad_token_id": tok.token_to_id("[PAD]")})
        batch = TextBatcher(tmp, mcfg.max_length, mcfg.pad_token_id)
        ids, mask = batch(captions)
        model = Clip(mcfg)
        model.text.init_weights(cfg.seed)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
        warm = max(1, cfg.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, cfg.steps) / cfg.steps)))
        g = torch.Generator().manual_seed(cfg.seed)
        model.train()
        order = torch.randperm(len(items), generator=g)
        pos = 0
        for _ in range(cfg.steps):
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(len(items), generator=g), 0
            b = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            T = int(mask[b].sum(1).max())
            loss = clip_loss(model(x[b], ids[b, :T], mask[b, :T]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        save_clip(model, out, tmp)
    metrics: dict[str, Any] = {"train_pairs": cfg.train_pairs, "steps": cfg.steps, "batch_size": cfg.batch_size,
                               "first_loss": round(losses[0], 4),
                               "final_train_loss": round(float(np.mean(losses[-10:])), 4),
                               "temperature": round(float(1 / model.logit_scale.detach().exp()), 4),
                               "train_seconds": round(time.perf_counter() - t0, 1)}
    metrics.update(evaluate_clip(out, seed=cfg.seed + 1, langs=cfg.langs))
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "train_config.json", {**asdict(cfg), "model": mcfg.to_dict()})
    return metrics


class ClipRunner:
    """A trained CLIP directory, loaded once: embed images and texts (unit vectors)."""

    def __init__(self, model_dir: str | Path):
        self.model = load_clip(model_dir)
        c = self.model.config
        self.batch = TextBatcher(model_dir, c.max_length, c.pad_token_id)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = [self.model.encode_text(*self.batch(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.model.config.embed_dim)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        x = images_to_tensor(images)
        return torch.cat([self.model.encode_image(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def zero_shot(runner: ClipRunner, images: np.ndarray, items: list[shapes.Item], lang: str = "en"
              ) -> dict[str, float]:
    """Accuracy of picking each image's colour / object / position among all classes, where a class embedding is
    the normalised mean of the embeddings of every caption that names it (prompt ensembling)."""
    import torch.nn.functional as F

    img = runner.embed_images(images)
    res = {}
    for attr, classes in (("colour", list(shapes.COLOURS)), ("object", shapes.OBJECTS),
                          ("position", list(shapes.POSITIONS))):
        protos = []
        for c in classes:
            prompts = [it.caption for it in shapes.all_items((lang,)) if getattr(it, attr if attr != "object" else "obj") == c]
            protos.append(F.normalize(runner.embed_texts(prompts).mean(0), dim=0))
        pred = (img @ torch.stack(protos).T).argmax(1)
        gold = torch.tensor([classes.index(getattr(it, attr if attr != "object" else "obj")) for it in items])
        res[f"zero_shot_{attr}_{lang}"] = round(float((pred == gold).float().mean()), 4)
        res[f"chance_{attr}"] = round(1 / len(classes), 4)
    return res


def evaluate_clip(model_dir: str | Path, *, seed: int = 1, langs: Sequence[str] = ("en", "zh"),
                  ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, Any]:
    """Recall@k both ways and zero-shot accuracy on freshly rendered held-out pairs (every combination once)."""
    runner = ClipRunner(model_dir)
    res: dict[str, Any] = {}
    for lang in langs:
        images, items = shapes.heldout_pairs(seed=seed, size=runner.model.config.image_size, lang=lang)
        sim = runner.embed_images(images) @ runner.embed_texts([it.caption for it in items]).T  # (N images, N texts)
        res[f"heldout_pairs_{lang}"] = len(items)
        res.update({f"i2t_{k}_{lang}": round(v, 4) for k, v in recall_at_k(sim, ks).items()})
        res.update({f"t2i_{k}_{lang}": round(v, 4) for k, v in recall_at_k(sim.T, ks).items()})
        res.update(zero_shot(runner, images, items, lang))
    return res


# ---------------------------------------------------------------------------------------------- embed / search
def _image_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such image file or directory")
    if not files:
        raise DataError(f"no image files under {', '.join(paths)}")
    if len(files) > MAX_IMAGES:
        raise DataError(f"{len(files):,} images is over the {MAX_IMAGES:,} limit for one index")
    return files


def load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes is over the {MAX_IMAGE_BYTES:,}-byte image limit")
    try:
        with Image.open(path) as im:
            if im.width * im.height > 40_000_000:
                raise DataError(f"{path}: {im.width}x{im.height} pixels is too large")
            return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def embed_images_to_index(model_dir: str | Path, paths: Sequence[str], out: str | Path) -> dict[str, Any]:
    """Embed image files into ``out`` (``embeddings.npy`` float32 (N, D) + ``images.json`` with the paths)."""
    runner = ClipRunner(model_dir)
    files = _image_files(paths)
    arr = np.stack([load_image(f, runner.model.config.image_size) for f in files])
    emb = runner.embed_images(arr).numpy().astype(np.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", emb)
    atomic_write_json(out / "images.json", {"model": str(model_dir), "images": [str(f.resolve()) for f in files]})
    return {"images": len(files), "dim": int(emb.shape[1]), "out": str(out)}


def search(model_dir: str | Path, index_dir: str | Path, query: str, k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` indexed images closest to a text query: [{image, score}] best first."""
    index = Path(index_dir)
    if not (index / "embeddings.npy").is_file() or not (index / "images.json").is_file():
        raise DataError(f"{index}: not an image index (make one with `lmstack clip embed MODEL IMAGES --out DIR`)")
    if not query.strip():
        raise DataError("empty search query")
    emb = np.load(index / "embeddings.npy", allow_pickle=False)
    names = json.loads((index / "images.json").read_text())["images"]
    if emb.ndim != 2 or len(names) != len(emb):
        raise DataError(f"{index}: embeddings.npy and images.json disagree")
    q = ClipRunner(model_dir).embed_texts([query[:1000]]).numpy()[0]
    if q.shape[0] != emb.shape[1]:
        raise DataError(f"{index}: embeddings have dimension {emb.shape[1]}, the model {q.shape[0]} (another model?)")
    scores = emb @ q
    top = np.argsort(-scores, kind="stable")[:max(1, k)]
    return [{"image": names[i], "score": round(float(scores[i]), 4)} for i in top]


def search_page(results: list[dict[str, Any]], query: str) -> str:
    """A self-contained HTML page showing the results (images inlined as data URLs)."""
    import base64
    import html

    cells = []
    for r in results:
        data = base64.b64encode(Path(r["image"]).read_bytes()).decode()
        cells.append(f'<figure><img src="data:image/png;base64,{data}" width="128" height="128" '
                     f'style="image-rendering:pixelated"><figcaption>{html.escape(Path(r["image"]).name)} '
                     f'{r["score"]:.3f}</figcaption></figure>')
    return (f"<!doctype html><meta charset='utf-8'><title>lmstack clip search</title>"
            f"<h1>{html.escape(query)}</h1><div style='display:flex;flex-wrap:wrap;gap:8px'>{''.join(cells)}</div>")
