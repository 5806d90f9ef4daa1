"""Cited answers: retrieved chunks as numbered sources in the prompt, the model's ``[n]`` citations mapped back
to them, and the checks ``lmstack rag eval`` reports (faithfulness, citation accuracy).

    hits = DocRetriever("docs.sqlite").search(question, k=5)
    messages = rag_messages(question, hits)                   # system: instructions + "[1] (manual.pdf p. 3) ..."
    answer = llm.chat(messages, max_tokens=256).outputs[0].text
    cited = citations(answer, len(hits))                      # [1, 3]: source numbers the answer used
    sources(hits, cited)                                      # what the API response carries in "sources"

**Faithfulness** of an answer is the share of its sentences that are supported by the chunks it cites; a
sentence is supported when at least ``support`` (default 0.6) of its distinct index terms
(:func:`lmstack.rag.analyze.terms`: English stems, Chinese bigrams) occur in one cited chunk -- a lexical
entailment proxy, cheap and deterministic, that catches answers stating what no cited source says (it does
not catch a negation). A sentence with no index terms (a greeting) is skipped.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from lmstack.rag.analyze import terms
from lmstack.rag.store import Hit

SYSTEM = ("Answer the question using only the numbered sources below. After each sentence, cite the sources it "
          "comes from as [1], [2]. If the sources do not contain the answer, say that you do not know.")
SYSTEM_ZH = "只根据下面编号的资料回答问题，每句话后用 [1]、[2] 标注出处。资料里没有答案时，就说不知道。"
_CITE = re.compile(r"\[(\d{1,3}(?:\s*[,，、]\s*\d{1,3})*)\]")
_SENT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


def where(chunk: Any) -> str:
    """``manual.pdf p. 3 > Reset`` -- a chunk's place, for the prompt and the source cards."""
    parts = [str(getattr(chunk, "source", "") or chunk.doc_id)]
    page = getattr(chunk, "page", None)
    if page:
        parts[0] += f" p. {page}"
    head = getattr(chunk, "headings", "") or ""
    return " > ".join(parts + ([head] if head else []))


def format_sources(hits: Iterable[Hit], max_chars: int | None = None) -> str:
    """``[n] (place) text`` blocks; stops before the chunk that would pass ``max_chars``."""
    out, used = [], 0
    for i, h in enumerate(hits, 1):
        block = f"[{i}] ({where(h.chunk)}) {h.chunk.text.strip()}"
        if max_chars is not None and out and used + len(block) + 2 > max_chars:
            break
        out.append(block)
        used += len(block) + 2
    return "\n\n".join(out)


def rag_system(hits: Sequence[Hit], system: str | None = None, lang: str = "en", max_chars: int | None = None) -> str:
    head = system or (SYSTEM_ZH if lang == "zh" else SYSTEM)
    body = format_sources(hits, max_chars)
    return f"{head}\n\nSources:\n{body}" if body else head


def rag_messages(question: str, hits: Sequence[Hit], history: Sequence[dict[str, Any]] = (),
                 system: str | None = None, max_chars: int | None = None) -> list[dict[str, Any]]:
    """The chat messages for a grounded answer: the sources in the system message, then the history and the
    question."""
    from lmstack.rag.analyze import query_lang

    return [{"role": "system", "content": rag_system(hits, system, query_lang(question), max_chars)},
            *history, {"role": "user", "content": question}]


def citations(text: str, n_sources: int) -> list[int]:
    """The distinct source numbers ``[n]`` / ``[1, 2]`` cited in ``text`` that exist (1..n_sources), in order."""
    out: list[int] = []
    for m in _CITE.finditer(text):
        for x in re.split(r"\s*[,，、]\s*", m.group(1)):
            n = int(x)
            if 1 <= n <= n_sources and n not in out:
                out.append(n)
    return out


def source_dict(n: int, hit: Hit, text_chars: int = 600) -> dict[str, Any]:
    c = hit.chunk
    text = c.text if len(c.text) <= text_chars else c.text[:text_chars] + "…"
    return {"n": n, "id": c.id, "source": getattr(c, "source", "") or c.doc_id, "title": c.title,
            "headings": getattr(c, "headings", ""), "page": getattr(c, "page", None),
            "start": getattr(c, "start", None), "end": getattr(c, "end", None), "score": round(float(hit.score), 6),
            "text": text}


def sources(hits: Sequence[Hit], cited: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The API's ``sources``: every retrieved chunk with its number, ``cited`` true for those the answer cites."""
    return [{**source_dict(i, h), "cited": cited is not None and i in cited} for i, h in enumerate(hits, 1)]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if s and s.strip()]


def supported(sentence: str, passages: Sequence[str], support: float = 0.6) -> bool | None:
    """Whether one of ``passages`` holds at least ``support`` of the sentence's distinct index terms (None: the
    sentence has no terms once its citation marks are dropped)."""
    want = set(terms(_CITE.sub(" ", sentence)))
    if not want:
        return None
    return any(len(want & set(terms(p))) >= support * len(want) for p in passages)


def faithfulness(answer: str, hits: Sequence[Hit], support: float = 0.6) -> float | None:
    """The share of the answer's sentences supported by the chunks that sentence cites -- or, for a sentence
    without a citation, by the chunks the answer cites anywhere (None: nothing to judge)."""
    n_src = len(hits)
    cited_any = citations(answer, n_src)
    verdicts = []
    for s in sentences(answer):
        own = citations(s, n_src) or cited_any
        v = supported(s, [hits[i - 1].chunk.text for i in own], support)
        if v is not None:
            verdicts.append(v)
    return sum(verdicts) / len(verdicts) if verdicts else None


def groundedness(answer: str, hits: Sequence[Hit], support: float = 0.6) -> float | None:
    """The share of the answer's sentences supported by ANY shown chunk, citations ignored (None: nothing to
    judge): what is left of :func:`faithfulness` for a model that answers from its sources without citing them
    (an uncited answer has faithfulness 0 however well it reads its sources)."""
    texts = [h.chunk.text for h in hits]
    verdicts = [v for v in (supported(s, texts, support) for s in sentences(answer)) if v is not None]
    return sum(verdicts) / len(verdicts) if verdicts else None


def ask(llm: Any, retriever: Any, question: str, *, k: int = 5, mode: str = "hybrid", max_tokens: int = 256,
        history: Sequence[dict[str, Any]] = (), **search_kw: Any) -> dict[str, Any]:
    """Retrieve, prompt with numbered sources, generate (greedy): ``{"answer", "sources"}`` (every retrieved
    chunk, ``cited`` marking those the answer cites)."""
    hits = retriever.search(question, k, mode=mode, **search_kw)
    out = llm.chat(rag_messages(question, hits, history), temperature=0.0, max_tokens=max_tokens)
    text = out.outputs[0].text
    return {"answer": text, "sources": sources(hits, citations(text, len(hits)))}
