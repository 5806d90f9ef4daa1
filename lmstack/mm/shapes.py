"""A synthetic image--caption set, made here with Pillow and released CC0 with lmstack.

Each image is ``size`` x ``size`` RGB: one coloured shape (circle, square, triangle, cross, diamond) or one digit
(0--9) drawn at one of four positions (top left, top right, bottom left, bottom right) with a random scale,
offset and light background tint. Its caption names the colour, the object and the position, in English or
Chinese (``"a red circle at the top left"`` / ``"左上方的红色圆形"``). The attributes are kept next to the caption
so zero-shot classification and recall@k can be scored exactly.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

COLOURS = {  # name -> (RGB, zh)
    "red": ((220, 30, 30), "红色"), "green": ((30, 170, 40), "绿色"), "blue": ((30, 60, 220), "蓝色"),
    "yellow": ((235, 200, 0), "黄色"), "purple": ((140, 40, 180), "紫色"), "black": ((20, 20, 20), "黑色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "cross": "十字", "diamond": "菱形"}
DIGITS = {str(d): f"数字{d}" for d in range(10)}
POSITIONS = {  # name -> (centre as a fraction of the side, zh)
    "top left": ((0.27, 0.27), "左上方"), "top right": ((0.73, 0.27), "右上方"),
    "bottom left": ((0.27, 0.73), "左下方"), "bottom right": ((0.73, 0.73), "右下方"),
}
OBJECTS = list(SHAPES) + list(DIGITS)


@dataclass(frozen=True)
class Item:
    colour: str
    obj: str  # a shape name or a digit "0".."9"
    position: str
    lang: str  # en | zh

    @property
    def caption(self) -> str:
        return caption(self.colour, self.obj, self.position, self.lang)


def caption(colour: str, obj: str, position: str, lang: str = "en") -> str:
    if lang == "zh":
        name = SHAPES.get(obj) or DIGITS[obj]
        return f"{POSITIONS[position][1]}的{COLOURS[colour][1]}{name}"
    name = obj if obj in SHAPES else f"digit {obj}"
    return f"a {colour} {name} at the {position}"


def render(item: Item, size: int = 32, rng: random.Random | None = None) -> np.ndarray:
    """(size, size, 3) uint8 image of ``item``; ``rng`` jitters scale, offset and background."""
    from PIL import Image, ImageDraw, ImageFont

    rng = rng or random.Random(0)
    bg = tuple(235 + rng.randrange(21) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    (fx, fy), _ = POSITIONS[item.position]
    r = size * rng.uniform(0.14, 0.2)
    cx = size * fx + rng.uniform(-0.05, 0.05) * size
    cy = size * fy + rng.uniform(-0.05, 0.05) * size
    col = COLOURS[item.colour][0]
    o = item.obj
    if o == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif o == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif o == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif o == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
    elif o == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    else:
        font = ImageFont.load_default(size=max(8, int(r * 2.6)))
        d.text((cx, cy), o, fill=col, font=font, anchor="mm")
    return np.asarray(im, dtype=np.uint8)


def all_items(langs: tuple[str, ...] = ("en", "zh")) -> list[Item]:
    return [Item(c, o, p, lang) for c in COLOURS for o in OBJECTS for p in POSITIONS for lang in langs]


def make_pairs(n: int, seed: int = 0, size: int = 32, langs: tuple[str, ...] = ("en", "zh")
               ) -> tuple[np.ndarray, list[Item]]:
    """``n`` random (image, item) pairs: images (n, size, size, 3) uint8."""
    rng = random.Random(seed)
    combos = all_items(langs)
    items = [rng.choice(combos) for _ in range(n)]
    return np.stack([render(it, size, rng) for it in items]) if items else np.zeros((0, size, size, 3), np.uint8), items


def heldout_pairs(seed: int = 1, size: int = 32, lang: str = "en", limit: int | None = None
                  ) -> tuple[np.ndarray, list[Item]]:
    """Every (colour, object, position) once in ``lang``, freshly rendered: captions are unique, so image->text
    and text->image recall@k have exactly one right answer."""
    rng = random.Random(seed)
    items = all_items((lang,))
    rng.shuffle(items)
    items = items[:limit] if limit else items
    return np.stack([render(it, size, rng) for it in items]), items


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, size: int = 32) -> Path:
    """PNG files plus ``captions.jsonl`` ({image, caption, colour, object, position, lang}) under ``out_dir``."""
    from PIL import Image

    from lmstack.utils.io import write_jsonl

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    imgs, items = make_pairs(n, seed, size)
    rows = []
    for i, (im, it) in enumerate(zip(imgs, items)):
        name = f"images/{i:06d}.png"
        Image.fromarray(im).save(out / name)
        rows.append({"image": name, "caption": it.caption, **{k: v for k, v in asdict(it).items()}})
    write_jsonl(out / "captions.jsonl", rows)
    (out / "LICENSE.txt").write_text("CC0 1.0: generated by lmstack.mm.shapes; no rights reserved.\n")
    return out


def iter_rows(path: Path) -> Iterator[dict]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)
