"""Retrieved chunks -> the text a model reads, and retrieval recall for evaluation.

The context goes into the system message, numbered so an answer could cite it::

    You are the support assistant of Larkspur Home, an online shop. Answer briefly.

    Knowledge base:
    [1] Q: How long does standard shipping take?
    A: Standard shipping takes 3-5 business days after your order ships.
    [2] ...
"""

from __future__ import annotations

from typing import Iterable, Sequence

from lmstack.rag.store import Hit

HEADER = "Knowledge base:"


def format_context(hits: Iterable[Hit], max_chars: int | None = None) -> str:
    """``[n] text`` lines under a header; stops before the chunk that would pass ``max_chars``."""
    lines = [HEADER]
    used = len(HEADER)
    for i, h in enumerate(hits, 1):
        line = f"[{i}] {h.chunk.text.strip()}"
        if max_chars is not None and i > 1 and used + 1 + len(line) > max_chars:
            break
        lines.append(line)
        used += 1 + len(line)
    return "\n".join(lines) if len(lines) > 1 else ""


def with_context(system_prompt: str, hits: Sequence[Hit], max_chars: int | None = None) -> str:
    """The system prompt followed by the formatted context (just the prompt when nothing was retrieved)."""
    ctx = format_context(hits, max_chars)
    return f"{system_prompt}\n\n{ctx}" if ctx else system_prompt


def recall_at_k(ranked: Sequence[Sequence[str]], gold: Sequence[str | Iterable[str]], k: int) -> float:
    """Share of queries whose top-``k`` ids include a gold id (``gold[i]``: one id or a set of ids)."""
    if len(ranked) != len(gold):
        raise ValueError(f"{len(ranked)} rankings for {len(gold)} gold answers")
    if not ranked:
        return 0.0
    hit = 0
    for ids, g in zip(ranked, gold):
        want = {g} if isinstance(g, str) else set(g)
        hit += bool(want & set(ids[:k]))
    return hit / len(ranked)
