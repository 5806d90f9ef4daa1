"""NeMo Guardrails' perplexity heuristics for jailbreak prompts, computed with the served model.

From ``nemoguardrails/library/jailbreak_detection/heuristics/checks.py`` (which uses GPT-2 large; the thresholds
below are NeMo's defaults, tuned for that model -- with another model they need re-tuning on your traffic):

- length per perplexity: ``len(text) / ppl(text) >= 89.79`` flags long prompts that a model finds unusually
  predictable for their length (many GCG-style and copy-pasted jailbreak prompts);
- prefix / suffix perplexity: with at least 20 words, ``ppl(words[0:19])`` or ``ppl(words[-20:-1])`` ``>= 1845.65``
  flags gibberish adversarial suffixes or prefixes (Zou et al. 2023 GCG attacks).

``ppl(text) = exp(mean over tokens t_2..t_n of -log p(t_i | t_<i))``. The scorer is a function ``str -> float``
(the perplexity); :func:`model_perplexity` builds one from an lmstack model and tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

LP_THRESHOLD = 89.79
PS_THRESHOLD = 1845.65
MAX_SCORED_TOKENS = 1024


@dataclass
class PerplexityCheck:
    length_per_perplexity: float
    prefix_perplexity: float | None
    suffix_perplexity: float | None
    flagged_lp: bool
    flagged_ps: bool

    @property
    def flagged(self) -> bool:
        return self.flagged_lp or self.flagged_ps


def check_perplexity(text: str, ppl: Callable[[str], float], lp_threshold: float = LP_THRESHOLD,
                     ps_threshold: float = PS_THRESHOLD) -> PerplexityCheck:
    """Both heuristics, as NeMo computes them (module docstring)."""
    lp = len(text) / max(ppl(text), 1e-9)
    words = text.strip().split()
    pre = suf = None
    if len(words) >= 20:
        pre = ppl(" ".join(words[0:19]))
        suf = ppl(" ".join(words[-20:-1]))
    ps = pre is not None and (pre >= ps_threshold or suf >= ps_threshold)
    return PerplexityCheck(round(lp, 4), pre, suf, lp >= lp_threshold, bool(ps))


def model_perplexity(model: Any, tokenizer: Any, device: str | torch.device | None = None) -> Callable[[str], float]:
    """``text -> perplexity`` under an lmstack causal model (the first ``MAX_SCORED_TOKENS`` tokens)."""
    dev = device or next(model.parameters()).device

    @torch.no_grad()
    def ppl(text: str) -> float:
        ids = tokenizer.encode(text)[:MAX_SCORED_TOKENS]
        if len(ids) < 2:
            return 1.0
        x = torch.tensor([ids], device=dev)
        logits = model(x).float()[0, :-1]  # (T-1, V): predictions for tokens 2..T
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="mean")
        return math.exp(float(nll))

    return ppl
