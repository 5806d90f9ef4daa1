"""Grounding the support assistant in its knowledge base: KB chunks, their index, and the context of a turn.

The same function builds the context for a training chat, an evaluation question and a live conversation
(:func:`context_hits`), so the model is always asked in the format it was tuned on.

Chunks (one retrieval unit each, in the question's language):

- ``faq/<id>.<lang>``          ``Q: <first way of asking>\\nA: <answer>``; with ``faq_keywords`` the other
                               *training* ways of asking are searchable too (never the held-out one);
- ``product/<sku>.<lang>``     the product's description and one sentence per fact (price, warranty, ...);
- ``policy/<name>.<lang>#<n>`` policy pages cut at their sections (:func:`lmstack.rag.chunk_documents`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from lmstack.apps.support.dialogues import faq_dev_count
from lmstack.apps.support.kb import LANGS, ShopKB
from lmstack.rag import Chunk, Hit, Retriever, chunk_documents, query_lang

DEFAULT_K = 3
KB_CANDIDATES = 20  # per ranking (BM25, dense) before reciprocal-rank fusion


def product_chunk_text(p: dict[str, Any], lang: str) -> str:
    """The product's page as a passage: name, SKU, description, then one plain sentence per fact (price,
    warranty, material, colors, weight) -- the sentences the shop's answers use, so a small model answers
    by finding the right sentence and copying it."""
    from lmstack.apps.support.dialogues import product_facts

    sep = " " if lang == "en" else ""
    head = f"{p['name'][lang]} ({p['sku']}): " if lang == "en" else f"{p['name'][lang]}（{p['sku']}）："
    return head + p["description"][lang] + "\n" + sep.join(product_facts(p, lang).values())


def kb_chunks(kb: ShopKB, *, faq_keywords: bool = False, policy_max_chars: int = 400) -> list[Chunk]:
    """Every retrieval unit of the shop (see the module docstring), in a fixed order."""
    out: list[Chunk] = []
    for e in kb.faqs:
        for lang in LANGS:
            q = e[lang]["q"]
            out.append(Chunk(id=f"faq/{e['id']}.{lang}", doc_id=f"faq/{e.get('topic', 'general')}.{lang}",
                             text=f"Q: {q[0]}\nA: {e[lang]['a']}", title=e.get("topic", ""), lang=lang,
                             source="shop:faq.yaml",
                             keywords="\n".join(q[1:len(q) - 1 - faq_dev_count(q)]) if faq_keywords else ""))
    for p in kb.products:
        for lang in LANGS:
            out.append(Chunk(id=f"product/{p['sku']}.{lang}", doc_id=f"product/{p['sku']}.{lang}",
                             text=product_chunk_text(p, lang), title=p["name"][lang], lang=lang,
                             source="shop:products.yaml"))
    pages = [{"id": f"policy/{name}.{lang}", "lang": lang, "text": text, "source": f"shop:policies/{name}.{lang}.md"}
             for name, by_lang in sorted(kb.policies.items()) for lang, text in sorted(by_lang.items())]
    out.extend(chunk_documents(pages, max_chars=policy_max_chars))
    return out


def gold_chunk_id(item_id: str) -> str:
    """The chunk holding the fact a QA item asks about: ``faq/x.en`` -> itself, ``product/S/price.en`` ->
    ``product/S.en``."""
    if item_id.startswith("product/"):
        _, sku, rest = item_id.split("/", 2)
        return f"product/{sku}.{rest.rsplit('.', 1)[1]}"
    return item_id


def build_kb_index(kb: ShopKB, path: str | Path, *, faq_keywords: bool = False, policy_max_chars: int = 400,
                   embedder: Any = None, dense_langs: Sequence[str] | None = ("en",)) -> dict[str, Any]:
    """Write the shop's retrieval index: the general document index (:func:`lmstack.rag.index.index_chunks`)
    over :func:`kb_chunks`, embedded (each chunk's text and each FAQ keyword line) for ``dense_langs`` when an
    ``embedder`` is given. Read it with :func:`open_kb_retriever`."""
    from lmstack.rag.index import index_chunks

    return index_chunks(kb_chunks(kb, faq_keywords=faq_keywords, policy_max_chars=policy_max_chars), path,
                        embedder=embedder, dense_langs=dense_langs)


def open_kb_retriever(path: str | Path, embedder: Any = "auto") -> Any:
    """The shop's index opened for search: :class:`lmstack.rag.index.DocRetriever` with the candidate depth the
    assistant was measured with (20 per ranking before fusion); an index from before the move onto the
    document index opens in the older :class:`lmstack.rag.Retriever` (same ``search``)."""
    from lmstack.rag.index import open_retriever

    return open_retriever(path, embedder=embedder, candidates=KB_CANDIDATES)


def context_hits(retriever: Retriever, question: str, previous: Sequence[str] = (), k: int = DEFAULT_K) -> list[Hit]:
    """The chunks a turn is answered from: the top ``k`` for ``question`` (in its language), then the top
    chunk of the previous question (so a follow-up like "And express?" keeps what the last answer used),
    without duplicates. The previous question's chunk is left out when it is in another language, or when
    the question itself retrieves nothing (a greeting is answered without passages, as in training)."""
    lang = query_lang(question)
    hits = retriever.search(question, k=k, lang=lang)
    if previous and hits and query_lang(previous[-1]) == lang:
        seen = {h.chunk.id for h in hits}
        prev = previous[-1]
        for h in retriever.search(prev, k=1, lang=query_lang(prev)):
            if h.chunk.id not in seen:
                hits.append(Hit(h.chunk, h.score, len(hits) + 1))
    return hits


def _with_gold(hits: list[Hit], gold: list[str], retriever: Retriever, k: int) -> list[Hit]:
    """``hits`` with every gold chunk present: a missing one replaces the lowest-ranked non-gold hit."""
    have = {h.chunk.id for h in hits}
    for g in gold:
        if g in have:
            continue
        chunk = retriever.get(g)
        if chunk is None:
            continue
        keep = [h for h in hits if h.chunk.id in gold]
        rest = [h for h in hits if h.chunk.id not in gold]
        if len(hits) >= max(k, len(gold)) and rest:
            rest = rest[:-1]
        hits = keep + rest + [Hit(chunk, 0.0, 0)]
        have.add(g)
    return hits


CITATION = re.compile(r"\s*(?:\[\d{1,2}\])+\s*$")  # " [2]" / " [1][3]" at the end of an answer


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def states(passage: str, answer: str) -> bool:
    """Whether ``passage`` contains ``answer`` word for word (whitespace aside)."""
    a = _squeeze(answer)
    return bool(a) and a in _squeeze(passage)


def cite_passage(answer: str, hits: Sequence[Hit], gold: str | None = None) -> int | None:
    """The 1-based number of the passage an answer is taken from: the first shown passage that contains the
    answer's text (whitespace aside), else the one holding the answer's fact (``gold`` chunk id); None when
    neither is shown (a greeting, a refusal)."""
    for i, h in enumerate(hits, 1):
        if states(h.chunk.text, answer):
            return i
    for i, h in enumerate(hits, 1):
        if gold is not None and h.chunk.id == gold:
            return i
    return None


def citation_numbers(text: str) -> list[int]:
    """The passage numbers an answer cites at its end (``... days. [1][3]`` -> [1, 3]; none -> [])."""
    m = CITATION.search(text)
    return [int(x) for x in re.findall(r"\d+", m.group(0))] if m else []


def guard_hits(hits: list[Hit], guard: Any, key: str | None = None) -> list[Hit]:
    """``hits`` with their passages sanitized by the guard's context rail (instruction-like sentences inside
    them cut out: indirect prompt injection); as they are without a guard."""
    if guard is None or not hits:
        return hits
    import dataclasses

    from lmstack.guard.serving import guard_passages

    clean = guard_passages(guard, [h.chunk.text for h in hits], key=key).passages
    return [dataclasses.replace(h, chunk=dataclasses.replace(h.chunk, text=t)) for h, t in zip(hits, clean)]


def strip_citations(text: str) -> str:
    """An answer without its trailing citation markers (``... 3-5 business days. [1]`` -> ``... days.``)."""
    return CITATION.sub("", text)


def ground_chat(rec: dict[str, Any], retriever: Retriever, k: int = DEFAULT_K, rng: Any = None,
                max_chars: int | None = None, cite: bool = False) -> dict[str, Any]:
    """A training chat with the retrieved passages in its system message.

    The passages are those :func:`context_hits` finds for its (last) question, with the chunks of the facts
    the answers state (``rec["facts"]``) put in when retrieval missed them, in a shuffled order (given
    ``rng``) so the model learns to pick the passage that answers, not the first one. With ``cite``, each
    answer that states a fact ends with the number of the passage it comes from (`` [2]``,
    :func:`cite_passage`): the model learns to say where its answer is from."""
    from lmstack.rag import with_context

    msgs = [dict(m) for m in rec["messages"]]
    users = [m["content"] for m in msgs if m["role"] == "user"]
    if not users:
        return {**rec, "messages": msgs}
    hits = context_hits(retriever, users[-1], users[:-1], k=k)
    hits = _with_gold(hits, [gold_chunk_id(f) for f in rec.get("facts") or []], retriever, k)
    if rng is not None:
        rng.shuffle(hits)
    if msgs[0]["role"] == "system":
        msgs[0]["content"] = with_context(msgs[0]["content"], hits, max_chars)
    if cite:
        facts = iter(rec.get("facts") or [])
        for m in msgs:
            if m["role"] != "assistant":
                continue
            fact = next(facts, None)
            n = cite_passage(m["content"], hits, gold_chunk_id(fact)) if fact else None
            if n is not None:
                m["content"] = f"{m['content']} [{n}]"
    return {**rec, "messages": msgs, "context": [h.chunk.id for h in hits]}


def ground_question(row: dict[str, Any], retriever: Retriever, k: int = DEFAULT_K,
                    max_chars: int | None = None) -> dict[str, Any]:
    """A held-out question row asked with retrieval exactly as the assistant does it (ranked, nothing
    added); ``context`` lists the chunk ids shown and ``gold`` the one that holds the answer."""
    from lmstack.rag import with_context

    msgs = [dict(m) for m in row["messages"]]
    hits = context_hits(retriever, row["question"], k=k)
    if msgs[0]["role"] == "system":
        msgs[0]["content"] = with_context(msgs[0]["content"], hits, max_chars)
    return {**row, "messages": msgs, "context": [h.chunk.id for h in hits], "gold": gold_chunk_id(row["id"]),
            "retrieved": [h.chunk.id for h in retriever.search(row["question"], k=10, lang=query_lang(row["question"]))]}
