"""The Larkspur Home knowledge base: a fictional online shop written for lmstack (English and Chinese).

The shipped files live in ``recipes/data/shop/`` (CC0-1.0):

- ``faq.yaml``       ~40 facts, each with several ways to ask it and one answer per language;
- ``products.yaml``  ~30 products (price, warranty, material, colors, weight, description);
- ``policies/*.md``  shipping, returns, warranty and payment pages, ``NAME.en.md`` / ``NAME.zh.md``.

:func:`load_kb` reads and validates them (a bad entry names the file, the entry and the field);
:func:`kb_documents` renders the pages a shop would publish -- policy pages, one FAQ page per topic and one
product page per product and language -- as plain documents for pretraining and, later, RAG.
FAQ pages show only the first way of asking each question, so the held-out paraphrases used for
evaluation never appear in any training text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.config import read_yaml
from lmstack.errors import DataError

LANGS = ("en", "zh")
SHOP_NAME = {"en": "Larkspur Home", "zh": "云雀家居"}
PRODUCT_FIELDS = ("sku", "name", "category", "price", "warranty_years", "material", "colors", "weight_kg", "description")
BILINGUAL_FIELDS = ("name", "category", "material", "colors", "description")


def default_kb_dir() -> Path:
    """``recipes/data/shop`` of the source checkout (where the shipped knowledge base lives)."""
    return Path(__file__).resolve().parents[3] / "recipes" / "data" / "shop"


@dataclass
class ShopKB:
    root: Path
    faqs: list[dict[str, Any]] = field(default_factory=list)
    products: list[dict[str, Any]] = field(default_factory=list)
    policies: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> lang -> markdown


def _read_yaml_list(path: Path) -> list[dict[str, Any]]:
    return read_yaml(path, expect=list, error=DataError,
                     what="knowledge-base file (it belongs in the shop data directory)")


def _check_faq(path: Path, i: int, e: Any) -> None:
    where = f"{path}: entry {i + 1}"
    if not isinstance(e, dict) or "id" not in e:
        raise DataError(f"{where}: each FAQ needs an 'id' field")
    where += f" ({e['id']})"
    for lang in LANGS:
        block = e.get(lang)
        if not isinstance(block, dict):
            raise DataError(f"{where}: missing '{lang}' block with 'q' (list of questions) and 'a' (answer)")
        q, a = block.get("q"), block.get("a")
        if not isinstance(q, list) or len(q) < 2 or not all(isinstance(x, str) and x.strip() for x in q):
            raise DataError(f"{where}: field {lang}.q must list at least 2 questions (the last one is held out)")
        if not isinstance(a, str) or not a.strip():
            raise DataError(f"{where}: field {lang}.a must be a non-empty answer")


def _check_product(path: Path, i: int, p: Any) -> None:
    where = f"{path}: entry {i + 1}"
    if not isinstance(p, dict):
        raise DataError(f"{where}: expected a mapping")
    for f in PRODUCT_FIELDS:
        if f not in p:
            raise DataError(f"{where} ({p.get('sku', '?')}): missing field '{f}'")
    for f in BILINGUAL_FIELDS:
        if not isinstance(p[f], dict) or not all(isinstance(p[f].get(lang), str) for lang in LANGS):
            raise DataError(f"{where} ({p['sku']}): field '{f}' needs 'en' and 'zh' strings")
    for f in ("price", "warranty_years", "weight_kg"):
        if not isinstance(p[f], (int, float)) or p[f] <= 0:
            raise DataError(f"{where} ({p['sku']}): field '{f}' must be a positive number, got {p[f]!r}")


def load_kb(root: str | Path | None = None) -> ShopKB:
    """Read and validate the shop knowledge base under ``root`` (default: the shipped one)."""
    root = Path(root) if root is not None else default_kb_dir()
    if not root.is_dir():
        raise DataError(f"{root}: shop knowledge-base directory not found (expected faq.yaml, products.yaml, policies/)")
    faqs = _read_yaml_list(root / "faq.yaml")
    for i, e in enumerate(faqs):
        _check_faq(root / "faq.yaml", i, e)
    ids = [e["id"] for e in faqs]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})
        raise DataError(f"{root / 'faq.yaml'}: duplicate FAQ ids {dup}")
    products = _read_yaml_list(root / "products.yaml")
    for i, p in enumerate(products):
        _check_product(root / "products.yaml", i, p)
    policies: dict[str, dict[str, str]] = {}
    for md in sorted((root / "policies").glob("*.md")):
        stem, _, lang = md.stem.rpartition(".")
        if lang not in LANGS:
            raise DataError(f"{md}: policy files are named NAME.en.md or NAME.zh.md")
        policies.setdefault(stem, {})[lang] = md.read_text(encoding="utf-8")
    return ShopKB(root=root, faqs=faqs, products=products, policies=policies)


def fmt_num(x: float) -> str:
    """34 -> "34", 0.45 -> "0.45", 2.6 -> "2.6" (no trailing zeros)."""
    return f"{x:g}"


def product_page(p: dict[str, Any], lang: str) -> str:
    name, sku = p["name"][lang], p["sku"]
    if lang == "en":
        return (
            f"# {name} ({sku})\n\n{p['description']['en']}\n\n"
            f"- Category: {p['category']['en']}\n- Price: ${fmt_num(p['price'])}\n"
            f"- Material: {p['material']['en']}\n- Colors: {p['colors']['en']}\n"
            f"- Weight: {fmt_num(p['weight_kg'])} kg\n- Warranty: {p['warranty_years']}-year limited warranty\n\n"
            f"The {name} costs ${fmt_num(p['price'])} at Larkspur Home and ships free on orders over $50.\n"
        )
    return (
        f"# {name}（{sku}）\n\n{p['description']['zh']}\n\n"
        f"- 类别：{p['category']['zh']}\n- 价格：{fmt_num(p['price'])}美元\n"
        f"- 材质：{p['material']['zh']}\n- 颜色：{p['colors']['zh']}\n"
        f"- 重量：{fmt_num(p['weight_kg'])}公斤\n- 保修：{p['warranty_years']}年有限保修\n\n"
        f"{name}在云雀家居售价{fmt_num(p['price'])}美元，订单满50美元免运费。\n"
    )


def faq_page(kb: ShopKB, topic: str, lang: str) -> str:
    title = {"en": f"# {SHOP_NAME['en']} FAQ: {topic}\n", "zh": f"# {SHOP_NAME['zh']}常见问题：{topic}\n"}[lang]
    items = [f"Q: {e[lang]['q'][0]}\nA: {e[lang]['a']}" for e in kb.faqs if e.get("topic") == topic]
    return title + "\n" + "\n\n".join(items) + "\n"


def kb_documents(kb: ShopKB) -> list[dict[str, Any]]:
    """Every page of the shop as ``{"id", "lang", "title", "text", "source"}``, in a fixed order."""
    docs: list[dict[str, Any]] = []
    for name, by_lang in sorted(kb.policies.items()):
        for lang, text in sorted(by_lang.items()):
            docs.append({"id": f"policy/{name}.{lang}", "lang": lang, "title": text.splitlines()[0].lstrip("# "),
                         "text": text, "source": f"shop:policies/{name}.{lang}.md"})
    topics = list(dict.fromkeys(e.get("topic", "general") for e in kb.faqs))
    for topic in topics:
        for lang in LANGS:
            text = faq_page(kb, topic, lang)
            docs.append({"id": f"faq/{topic}.{lang}", "lang": lang, "title": text.splitlines()[0].lstrip("# "),
                         "text": text, "source": "shop:faq.yaml"})
    for p in kb.products:
        for lang in LANGS:
            docs.append({"id": f"product/{p['sku']}.{lang}", "lang": lang, "title": p["name"][lang],
                         "text": product_page(p, lang), "source": "shop:products.yaml"})
    return docs
