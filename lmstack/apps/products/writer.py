"""The description writer: attributes in, a description out, batched through the serving engine; every answer
carries its factuality verdict (:func:`lmstack.apps.products.catalog.factuality`).

    w = DescriptionWriter.load("runs/products/bundle")
    w.describe([{"name": "Oak Serving Board", "category": "kitchen", "material": "solid oak", ...}], lang="en")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.apps.products.catalog import ATTRS, LANGS, factuality, price_text, prompt_text
from lmstack.errors import DataError

MAX_VALUE_CHARS = 200  # an attribute value longer than this is refused (untrusted input)


def check_attributes(attrs: Any, where: str = "attributes") -> dict[str, str]:
    """A user's attribute mapping -> the clean one the prompt shows; one clear error for anything else."""
    if not isinstance(attrs, dict):
        raise DataError(f"{where}: expected an object of attributes ({', '.join(('name',) + ATTRS)}), "
                        f"got {type(attrs).__name__}")
    unknown = sorted(set(attrs) - {"name", *ATTRS})
    if unknown:
        raise DataError(f"{where}: unknown attribute {unknown[0]!r}; use {', '.join(('name',) + ATTRS)}")
    out = {}
    for k in ("name", *ATTRS):
        v = attrs.get(k)
        if v is None:
            continue
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise DataError(f"{where}.{k}: expected text or a number, got {type(v).__name__}")
        v = str(v).strip()
        if not v or len(v) > MAX_VALUE_CHARS or "\n" in v:
            raise DataError(f"{where}.{k}: must be one line of 1-{MAX_VALUE_CHARS} characters")
        out[k] = v
    if "name" not in out:
        raise DataError(f"{where}: a product needs at least a name")
    return out


def with_price(attrs: dict[str, str], lang: str) -> dict[str, str]:
    """A bare number price gets the dataset's form ($34 / 34美元), the one the model was tuned on."""
    p = attrs.get("price")
    if p is not None:
        try:
            attrs = {**attrs, "price": price_text(float(p), lang)}
        except ValueError:
            pass
    return attrs


def chat(attrs: dict[str, str], lang: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt_text(attrs, lang)}]


@dataclass
class Described:
    text: str
    attributes: dict[str, str]
    lang: str
    facts: dict[str, Any]


class DescriptionWriter:
    def __init__(self, llm: Any, max_tokens: int = 96):
        self.llm = llm
        self.max_tokens = max_tokens

    @classmethod
    def load(cls, bundle: str | Path, max_num_seqs: int = 32) -> "DescriptionWriter":
        from lmstack.apps.bundle import read_bundle
        from lmstack.serve.llm import load

        b = read_bundle(bundle, app="products")
        llm = load(b.part("model"), adapter=b.part("adapter"), max_num_seqs=max_num_seqs)
        return cls(llm, int(b.settings.get("max_tokens", 96)))

    def generate(self, chats: list[list[dict[str, str]]], max_tokens: int | None = None) -> list[str]:
        """Greedy descriptions for many chats in one engine run (continuous batching)."""
        if not chats:
            return []
        prompts = [self.llm.chat_prompt(c) for c in chats]
        outs = self.llm.generate(prompts, use_tqdm=False, max_tokens=max_tokens or self.max_tokens, temperature=0.0)
        return [o.outputs[0].text.strip() for o in outs]

    def describe(self, products: list[dict[str, Any]], lang: str = "en") -> list[Described]:
        if lang not in LANGS:
            raise DataError(f"lang {lang!r}: use one of {', '.join(LANGS)}")
        attrs = [with_price(check_attributes(p, f"products[{i}]"), lang) for i, p in enumerate(products)]
        texts = self.generate([chat(a, lang) for a in attrs])
        return [Described(t, a, lang, factuality(t, {k: v for k, v in a.items()}, lang)) for t, a in zip(texts, attrs)]


def throughput(writer: DescriptionWriter, chats: list[list[dict[str, str]]], sequential: int = 0) -> dict[str, Any]:
    """Descriptions per second: all ``chats`` in one batched engine run, and the first ``sequential`` of them one
    request at a time (the same engine, no batching)."""
    t0 = time.perf_counter()
    texts = writer.generate(chats)
    batched = time.perf_counter() - t0
    out: dict[str, Any] = {"n": len(chats), "batched_s": batched, "batched_per_s": len(chats) / batched}
    if sequential:
        t0 = time.perf_counter()
        for c in chats[:sequential]:
            writer.generate([c])
        seq = time.perf_counter() - t0
        out.update(sequential_n=min(sequential, len(chats)), sequential_s=seq,
                   sequential_per_s=min(sequential, len(chats)) / seq)
    out["texts"] = texts
    return out
