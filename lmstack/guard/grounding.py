"""Grounding check: is each sentence of an answer supported by the retrieved passages?

A sentence's support score is its best match over the passages' sentences::

    lexical(s, p) = |terms(s) & terms(p)| / |terms(s)|          terms: the retrieval index's analyzer
                                                                 (lmstack.rag.analyze.terms: English content
                                                                 words stemmed, numbers, Chinese bigrams)
    score(s)      = max_p lexical                                (no embedder)
                  = max_p (lexical + cos(e(s), e(p))) / 2        (with the MiniLM embedder; English)

and a sentence that states a number no passage contains scores 0 ("Refunds within 90 days" against a passage
saying 30). Sentences with fewer than ``min_words`` terms ("Thanks!", "您好") make no claim and are skipped.
This is the "embedding + overlap" form of the fact check the issue asks for; it is not NLI: a sentence that
reuses the passage's words to say the opposite ("returns are NOT accepted") still scores high (docs/guard.md).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

_SENT = re.compile(r"[^.!?。！？；;\n]+(?:[.!?。！？；;]+|\n|$)")
_NUM = re.compile(r"\d+(?:[.,]\d+)?")
MAX_ANSWER_CHARS = 32_000
MAX_PASSAGE_CHARS = 200_000


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence (EN and ZH punctuation, and line breaks), whitespace-only ones dropped."""
    return [(m.start(), m.end()) for m in _SENT.finditer(text) if m.group().strip()]


def terms(text: str) -> set[str]:
    """The set of a sentence's content terms: the retrieval index's analyzer (lmstack.rag.analyze: stemmed English
    words without function words, numbers, Chinese character bigrams), so support is measured in the terms
    retrieval matched on."""
    from lmstack.rag.analyze import terms as index_terms

    return set(index_terms(text))


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUM.findall(unicodedata.normalize("NFKC", text))}


@dataclass
class SentenceSupport:
    start: int
    end: int
    text: str
    score: float
    supported: bool
    reason: str = ""


@dataclass
class GroundingResult:
    sentences: list[SentenceSupport] = field(default_factory=list)

    @property
    def unsupported(self) -> list[SentenceSupport]:
        return [s for s in self.sentences if not s.supported]

    @property
    def score(self) -> float:
        """The lowest sentence score (1.0 when no sentence makes a claim)."""
        return min((s.score for s in self.sentences), default=1.0)


def check_grounding(answer: str, passages: Sequence[str], *, threshold: float = 0.45, min_words: int = 3,
                    check_numbers: bool = True, embed: Any = None) -> GroundingResult:
    """Score each claim-making sentence of ``answer`` against ``passages`` (module docstring). ``embed``: a
    function ``list[str] -> (N, d)`` L2-normalised tensor, or None for the lexical score alone."""
    answer = answer[:MAX_ANSWER_CHARS]
    psents: list[str] = []
    budget = MAX_PASSAGE_CHARS
    for p in passages:
        p = p[:budget]
        budget -= len(p)
        psents += [p[s:e] for s, e in sentences(p)] + [p]  # sentences, and the whole passage
    pterms = [terms(s) for s in psents]
    pnums = set().union(*(numbers(p) for p in passages)) if passages else set()
    claims = [(s, e) for s, e in sentences(answer) if len(terms(answer[s:e])) >= min_words]
    sims = None
    if embed is not None and claims and psents:
        q = embed([answer[s:e] for s, e in claims])
        sims = (q @ embed(psents).T).clamp_min(0)  # (n_claims, n_passage_sentences)
    out = GroundingResult()
    for i, (s, e) in enumerate(claims):
        sent = answer[s:e]
        t = terms(sent)
        lex = [len(t & pt) / len(t) for pt in pterms] or [0.0]
        if sims is not None:
            score = max((lx + float(c)) / 2 for lx, c in zip(lex, sims[i].tolist()))
        else:
            score = max(lex)
        reason = ""
        missing = sorted(numbers(sent) - pnums) if check_numbers else []
        if missing:
            score, reason = 0.0, f"number(s) not in the passages: {', '.join(missing[:5])}"
        elif score < threshold:
            reason = f"support {score:.2f} < {threshold}"
        out.sentences.append(SentenceSupport(s, e, sent.strip(), round(score, 4), score >= threshold, reason))
    return out
