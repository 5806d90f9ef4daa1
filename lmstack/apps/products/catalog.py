"""The product-description dataset: attributes (name, category, material, size, colour, price; EN + ZH) and a
description written from them, and the factuality check every description is held to.

Where it comes from (written for lmstack, CC0-1.0):

- the Larkspur Home catalog (``recipes/data/shop/products.yaml``): 30 products, each in English and Chinese;
- generated products: a product type from a fixed list per category, a material, a colour and a size drawn from
  that type's own lists, a price in the type's range -- deterministic for a seed (:func:`generate`).

Each product gets one reference description per language from one of several templates (picked by the seed), and
every template states every attribute value verbatim, so the reference itself passes :func:`factuality`.
The products are split by product (both languages of a product fall in the same split): ``train``, ``dev`` and
``test`` (held out: never trained on, the numbers in docs/products.md are on it).

    python -m lmstack.apps.products.catalog recipes/data/products/products.jsonl   # regenerate the shipped file
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Iterable

ATTRS = ("category", "material", "colour", "size", "price")
LANGS = ("en", "zh")

# category -> product types: (en, zh, materials [(en, zh)], colours [(en, zh)], sizes [(en, zh)], price range)
_M = {
    "oak": ("solid oak", "实心橡木"), "walnut": ("walnut", "胡桃木"), "bamboo": ("bamboo", "竹"),
    "pine": ("pine", "松木"), "steel": ("stainless steel", "不锈钢"), "iron": ("cast iron", "铸铁"),
    "glass": ("borosilicate glass", "高硼硅玻璃"), "stoneware": ("stoneware", "粗陶"),
    "porcelain": ("porcelain", "瓷"), "linen": ("linen", "亚麻"), "cotton": ("organic cotton", "有机棉"),
    "wool": ("merino wool", "美利奴羊毛"), "velvet": ("velvet", "丝绒"), "rattan": ("rattan", "藤"),
    "jute": ("jute", "黄麻"), "brass": ("brass", "黄铜"), "aluminium": ("aluminium", "铝"),
    "marble": ("marble", "大理石"), "leather": ("leather", "皮革"), "ceramic": ("ceramic", "陶瓷"),
}
_C = {
    "white": ("white", "白色"), "black": ("black", "黑色"), "grey": ("grey", "灰色"), "natural": ("natural", "原木色"),
    "navy": ("navy blue", "藏青色"), "olive": ("olive green", "橄榄绿"), "red": ("brick red", "砖红色"),
    "sand": ("sand", "沙色"), "pink": ("blush pink", "浅粉色"), "yellow": ("mustard yellow", "芥末黄"),
    "brown": ("dark brown", "深棕色"), "gold": ("gold", "金色"), "teal": ("teal", "青绿色"), "cream": ("cream", "奶白色"),
}


def _sizes(unit_en: str, unit_zh: str, dims: Iterable[str]) -> list[tuple[str, str]]:
    return [(f"{d} {unit_en}", f"{d} {unit_zh}") for d in dims]


_CM = ("厘米",)
TYPES: dict[tuple[str, str], list[tuple[str, str, list[str], list[str], list[tuple[str, str]], tuple[int, int]]]] = {
    ("kitchen", "厨房"): [
        ("Serving Board", "餐板", ["oak", "walnut", "bamboo", "marble"], ["natural", "brown", "white"],
         _sizes("cm", "厘米", ["40 x 25", "50 x 30", "30 x 20"]), (18, 79)),
        ("Mixing Bowl", "搅拌碗", ["steel", "glass", "stoneware", "ceramic"], ["white", "cream", "teal", "grey"],
         _sizes("cm", "厘米", ["20", "24", "28"]), (12, 49)),
        ("Saucepan", "汤锅", ["steel", "iron", "aluminium"], ["black", "grey", "red"],
         _sizes("cm", "厘米", ["16", "18", "20"]), (29, 129)),
        ("Tea Set", "茶具套装", ["porcelain", "stoneware", "glass"], ["white", "teal", "sand", "cream"],
         _sizes("ml", "毫升", ["600", "800", "1000"]), (25, 99)),
    ],
    ("home", "家居"): [
        ("Cushion Cover", "靠垫套", ["linen", "cotton", "velvet", "wool"], ["olive", "navy", "pink", "yellow", "sand"],
         _sizes("cm", "厘米", ["45 x 45", "50 x 50", "40 x 60"]), (15, 45)),
        ("Floor Lamp", "落地灯", ["brass", "steel", "bamboo", "rattan"], ["gold", "black", "natural", "white"],
         _sizes("cm", "厘米", ["150", "160", "175"]), (69, 229)),
        ("Storage Basket", "收纳篮", ["rattan", "jute", "cotton", "bamboo"], ["natural", "sand", "grey", "cream"],
         _sizes("cm", "厘米", ["30 x 30", "40 x 30", "25 x 25"]), (14, 59)),
        ("Wall Mirror", "壁镜", ["brass", "oak", "aluminium", "rattan"], ["gold", "natural", "black"],
         _sizes("cm", "厘米", ["60", "80", "50 x 70"]), (49, 189)),
    ],
    ("bedroom", "卧室"): [
        ("Duvet Cover", "被套", ["linen", "cotton"], ["white", "grey", "pink", "olive", "cream"],
         _sizes("cm", "厘米", ["200 x 200", "220 x 240", "150 x 200"]), (49, 159)),
        ("Bedside Table", "床头柜", ["oak", "walnut", "pine", "bamboo"], ["natural", "brown", "white", "black"],
         _sizes("cm", "厘米", ["45 x 40", "50 x 35", "40 x 40"]), (79, 249)),
        ("Throw Blanket", "盖毯", ["wool", "cotton", "linen"], ["olive", "navy", "sand", "yellow", "grey"],
         _sizes("cm", "厘米", ["130 x 170", "150 x 200"]), (39, 139)),
    ],
    ("bath", "浴室"): [
        ("Bath Towel", "浴巾", ["cotton", "linen"], ["white", "sand", "teal", "grey", "pink"],
         _sizes("cm", "厘米", ["70 x 140", "90 x 160", "50 x 100"]), (12, 45)),
        ("Soap Dish", "皂碟", ["marble", "ceramic", "bamboo", "brass"], ["white", "natural", "gold", "black"],
         _sizes("cm", "厘米", ["12 x 8", "14 x 10"]), (8, 29)),
        ("Bath Mat", "浴室地垫", ["cotton", "jute", "bamboo"], ["white", "grey", "natural", "navy"],
         _sizes("cm", "厘米", ["50 x 80", "60 x 90"]), (19, 59)),
    ],
    ("outdoor", "户外"): [
        ("Garden Chair", "花园椅", ["pine", "aluminium", "rattan", "steel"], ["natural", "black", "white", "olive"],
         _sizes("cm", "厘米", ["55 x 60", "60 x 65"]), (59, 189)),
        ("Plant Pot", "花盆", ["ceramic", "stoneware", "jute", "brass"], ["white", "red", "grey", "teal", "sand"],
         _sizes("cm", "厘米", ["15", "22", "30"]), (9, 49)),
        ("Picnic Blanket", "野餐毯", ["cotton", "wool", "jute"], ["red", "navy", "yellow", "olive"],
         _sizes("cm", "厘米", ["150 x 150", "140 x 180"]), (25, 69)),
    ],
}

TEMPLATES = {
    "en": [
        "The {name} is a {category} essential made of {material}. It comes in {colour}, measures {size} and costs "
        "{price}.",
        "Made of {material}, this {name} brings {colour} to your {category}. Size: {size}. Price: {price}.",
        "Meet the {name}: {material} in {colour}, {size}, for the {category}. Yours for {price}.",
        "A {category} favourite, the {name} is crafted from {material} and finished in {colour}. It measures {size} "
        "and sells for {price}.",
    ],
    "zh": [
        "这款{name}是{category}必备好物，采用{material}制成，颜色为{colour}，尺寸{size}，售价{price}。",
        "{name}由{material}打造，{colour}款式，尺寸{size}，适合{category}使用，售价{price}。",
        "推荐{name}：{material}材质，{colour}，尺寸{size}，{category}好帮手，仅售{price}。",
    ],
}
INSTRUCTION = {
    "en": "Write a short product description in English that states every attribute below and nothing else "
          "about the product.",
    "zh": "请用中文写一段简短的商品描述，写出下面的每个属性，不要编造其他信息。",
}
LABELS = {"en": {"name": "name", "category": "category", "material": "material", "colour": "colour", "size": "size",
                 "price": "price"},
          "zh": {"name": "名称", "category": "类别", "material": "材质", "colour": "颜色", "size": "尺寸",
                 "price": "价格"}}


def price_text(price: float, lang: str) -> str:
    p = f"{price:g}"
    return f"${p}" if lang == "en" else f"{p}美元"


def _catalog_rows(shop_products: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shop's catalog as attribute rows (the catalog has no size: those rows leave it out)."""
    rows = []
    for p in shop_products:
        rows.append({"id": p["sku"], "source": "catalog",
                     **{lang: {"name": p["name"][lang], "category": p["category"][lang],
                               "material": p["material"][lang], "colour": p["colors"][lang], "size": None}
                        for lang in LANGS}, "price": p["price"]})
    return rows


def generate(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` generated products (deterministic for ``seed``); no two share all their attributes."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    rows: list[dict[str, Any]] = []
    cats = list(TYPES)
    while len(rows) < n:
        cat = rng.choice(cats)
        t_en, t_zh, mats, cols, sizes, (lo, hi) = rng.choice(TYPES[cat])
        m, c, s = rng.choice(mats), rng.choice(cols), rng.choice(sizes)
        price = rng.randrange(lo, hi + 1)
        key = (t_en, m, c, s, price)
        if key in seen:
            continue
        seen.add(key)
        mat, col = _M[m], _C[c]
        name = {"en": f"{mat[0].title() if len(mat[0].split()) == 1 else mat[0].split()[-1].title()} {t_en}",
                "zh": f"{mat[1]}{t_zh}"}
        rows.append({"id": f"GEN-{len(rows) + 1:04d}", "source": "generated",
                     **{lang: {"name": name[lang], "category": cat[i], "material": mat[i], "colour": col[i],
                               "size": s[i]} for i, lang in enumerate(LANGS)}, "price": price})
    return rows


def attributes(row: dict[str, Any], lang: str) -> dict[str, str]:
    """The attribute values a description in ``lang`` must state (size absent for catalog rows)."""
    a = dict(row[lang])
    a["price"] = price_text(row["price"], lang)
    return {k: str(v) for k, v in a.items() if v is not None}


def prompt_text(attrs: dict[str, str], lang: str) -> str:
    lines = [f"{LABELS[lang][k]}: {attrs[k]}" for k in ("name", *ATTRS) if k in attrs]
    return INSTRUCTION[lang] + "\n" + "\n".join(lines)


def reference(attrs: dict[str, str], lang: str, rng: random.Random) -> str:
    tpl = rng.choice(TEMPLATES[lang])
    if "size" not in attrs:  # the catalog rows: drop the size clause
        tpl = {"en": re.sub(r"(, measures \{size\}| Size: \{size\}\.|, \{size\}| It measures \{size\} and)", "",
                            tpl).replace("finished in {colour}. sells", "finished in {colour}. It sells"),
               "zh": re.sub(r"(，尺寸\{size\})", "", tpl)}[lang]
    return tpl.format(**attrs)


def build(shop_products: list[dict[str, Any]], n_generated: int = 300, seed: int = 0,
          test_fraction: float = 0.15, dev_fraction: float = 0.1) -> list[dict[str, Any]]:
    """Every (product, language) example with its split: one JSON-able dict each."""
    rng = random.Random(seed + 1)
    products = _catalog_rows(shop_products) + generate(n_generated, seed)
    order = list(range(len(products)))
    rng.shuffle(order)
    n_test, n_dev = round(len(products) * test_fraction), round(len(products) * dev_fraction)
    split = {i: ("test" if k < n_test else "dev" if k < n_test + n_dev else "train") for k, i in enumerate(order)}
    out = []
    for i, p in enumerate(products):
        for lang in LANGS:
            attrs = attributes(p, lang)
            out.append({"id": p["id"], "lang": lang, "split": split[i], "source": p["source"], "attributes": attrs,
                        "prompt": prompt_text(attrs, lang), "description": reference(attrs, lang, rng)})
    return out


# ------------------------------------------------------------------------------------------- factuality
def vocabulary(lang: str) -> dict[str, set[str]]:
    """Every category, material and colour value the dataset can hold, per attribute (the 'invented' check's
    list: a value of another product named in a description is an invented attribute)."""
    i = LANGS.index(lang)
    return {"category": {c[i] for c in TYPES}, "material": {m[i] for m in _M.values()},
            "colour": {c[i] for c in _C.values()}}


_NUM = re.compile(r"\d+(?:\.\d+)?")


def _contains(text: str, value: str, lang: str) -> bool:
    if lang == "zh" or re.search(r"[^\x00-\x7f]", value):
        return value in text
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(value.lower())}(?![A-Za-z0-9])", text.lower()) is not None


def factuality(text: str, attrs: dict[str, str], lang: str, vocab: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Does ``text`` state every attribute value (``missing``) and no other one (``invented``)?

    Present: each value appears verbatim (case-insensitive in English, on word boundaries). Invented: after the
    product's own values are cut out of the text, a category / material / colour of the dataset's vocabulary
    still appears, or a number appears that is not in any of the product's values (a price or a size the
    attributes do not give)."""
    vocab = vocab or vocabulary(lang)
    missing = [k for k, v in attrs.items() if not _contains(text, v, lang)]
    rest = text
    for v in sorted(attrs.values(), key=len, reverse=True):  # longest first: "German stainless steel" before "steel"
        rest = re.sub(re.escape(v), " ", rest, flags=re.IGNORECASE)
    invented = sorted({w for k in vocab for w in vocab[k] if w not in attrs.values() and _contains(rest, w, lang)})
    own_numbers = {n for v in attrs.values() for n in _NUM.findall(v)}
    invented += sorted({n for n in _NUM.findall(rest) if n not in own_numbers})
    return {"missing": missing, "invented": invented, "ok": not missing and not invented}


def main(argv: list[str] | None = None) -> None:  # python -m lmstack.apps.products.catalog OUT.jsonl
    import sys

    from lmstack.apps.support.kb import load_kb
    from lmstack.utils.io import write_jsonl

    out = Path((argv or sys.argv[1:])[0])
    rows = build(load_kb().products)
    write_jsonl(out, rows)
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
