"""Grounded answers by selection: the fine-tuned model picks, by likelihood, which knowledge-base sentence
of the retrieved passages answers the question (an extractive reader).

A ~10M-parameter model trained for minutes on a CPU does not yet copy facts out of its prompt reliably
(docs/quickstart.md measures its free-running answers), but it ranks candidate answers well enough to be
useful. So the assistant's default answer is the candidate with the highest mean token log-probability as
the assistant's reply to the same prompt the model was fine-tuned and evaluated with (system prompt +
passages + conversation), among

- the answer units of the retrieved passages: an FAQ passage's answer, each fact sentence of a product
  passage, each sentence of a policy passage;
- the shop's fixed greeting and out-of-scope replies in the question's language.

Every answer is therefore a sentence the shop wrote (no invented prices), and a wrong answer is a real
sentence about the wrong thing. ``mode="generate"`` keeps free generation (what ``lmstack serve`` alone does).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from lmstack.apps.support.dialogues import GREETINGS, OUT_OF_SCOPE

_SENT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")  # "1.2 kg" stays whole


def answer_units(chunk: Any) -> list[str]:
    """The sentences of one passage that could be a whole answer."""
    text = chunk.text.strip()
    if chunk.id.startswith("faq/") and "\nA: " in text:
        return [text.split("\nA: ", 1)[1].strip()]
    if chunk.id.startswith("product/") and "\n" in text:
        text = text.split("\n", 1)[1]  # the fact sentences (the first line is name + description)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "|"))]
    return [s.strip() for ln in lines for s in _SENT.split(ln) if len(s.strip()) > 3]


def candidates(hits: Sequence[Any], lang: str) -> list[str]:
    """Answer units of the passages, in rank order, then the fixed greeting and refusal (no duplicates)."""
    out: list[str] = []
    for h in hits:
        for u in answer_units(h.chunk):
            if u not in out:
                out.append(u)
    for table in (GREETINGS, OUT_OF_SCOPE):
        if table[lang][1] not in out:
            out.append(table[lang][1])
    return out


class Reader:
    """Scores candidate replies with a causal LM (:class:`lmstack.eval.lm.EvalLM`)."""

    def __init__(self, lm: Any):
        self.lm = lm
        template = getattr(lm.tok, "chat_template", None) or ""
        eos = getattr(lm.tok, "eos_token", None)
        self.end = "<|im_end|>" if "<|im_end|>" in template else (eos if isinstance(eos, str) else "")

    @classmethod
    def load(cls, model: str | Path, adapter: str | Path | None = None, device: str | None = None) -> "Reader":
        from lmstack.eval.lm import EvalLM

        return cls(EvalLM.load(model, adapter=adapter, device=device))

    def scores(self, prompt: str, cands: Sequence[str]) -> list[float]:
        """Mean log-probability per token of each candidate (+ the end-of-turn marker) after ``prompt``."""
        reqs = [self.lm.encode_pair(prompt, c + self.end) for c in cands]
        return [s / max(1, len(cont)) for (s, _), (_, cont) in zip(self.lm.loglikelihood_tokens(reqs), reqs)]

    def pick(self, prompt: str, cands: Sequence[str]) -> str:
        if not cands:
            return ""
        sc = self.scores(prompt, cands)
        return cands[max(range(len(cands)), key=lambda i: (sc[i], -i))]
