"""Copy-biased decoding for grounded answers: a logits processor that makes it easier for a small model to quote
its sources word for word.

Retrieval puts the facts into the prompt; a small model that has started to state one of them often drifts a
word away from the source ("The kettle *uses* matte black ..." for "The kettle *comes in* matte black ...") --
harmless to a reader, fatal to a price or a number. :class:`CopyBias` adds ``bias`` to the logit of every token
that would continue, verbatim, a span of the prompt the answer is currently reproducing: after the answer's
last ``n`` tokens (the longest suffix of at most ``max_ngram`` tokens, at least ``min_ngram``, that occurs in
the prompt), each token that follows an occurrence of that suffix in the prompt is raised. The model still
chooses every token -- which fact to state, when to stop, whether to quote at all (nothing is raised until the
answer's own words meet the prompt's); the bias only tips close calls toward the source's wording, the way
prompt-lookup decoding proposes draft tokens from the prompt (Saxena 2023) and copy mechanisms favour source
tokens (See et al. 2017), here as a soft prior on the logits.

    from lmstack.rag.copy import copy_bias
    llm.generate(prompt_ids, SamplingParams(max_tokens=64, logits_processors=[copy_bias(prompt_ids, bias=4.0)]))

It runs in the engine's per-request logits step (:mod:`lmstack.serve.logits`): O(max_ngram) dictionary lookups
per token, built once per request from the prompt's ids.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


class CopyBias:
    """The processor of one sequence (see the module docstring). ``source``: the token ids to copy from (the
    prompt, or only the passages' span of it)."""

    satisfied = None  # a soft prior: it never constrains the output

    def __init__(self, source: Sequence[int], bias: float = 4.0, max_ngram: int = 8, min_ngram: int = 1):
        if max_ngram < min_ngram or min_ngram < 1:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.bias, self.max_ngram, self.min_ngram = float(bias), max_ngram, min_ngram
        src = list(source)
        self.next: dict[tuple[int, ...], set[int]] = {}  # n-gram of the source -> the tokens that follow it
        for end in range(1, len(src)):
            follower = src[end]
            for n in range(min_ngram, min(max_ngram, end) + 1):
                self.next.setdefault(tuple(src[end - n:end]), set()).add(follower)
        self.out: list[int] = []

    def followers(self, generated: Sequence[int]) -> set[int]:
        """The tokens that would continue the longest suffix of ``generated`` found in the source (empty when
        no suffix of at least ``min_ngram`` tokens is)."""
        for n in range(min(self.max_ngram, len(generated)), self.min_ngram - 1, -1):
            hit = self.next.get(tuple(generated[len(generated) - n:]))
            if hit:
                return hit
        return set()

    def __call__(self, logits: Tensor, seq: Any = None) -> Tensor:
        ids = self.followers(self.out)
        if ids:
            idx = torch.tensor(sorted(i for i in ids if i < logits.shape[-1]), dtype=torch.long, device=logits.device)
            logits.index_add_(0, idx, torch.full((len(idx),), self.bias, dtype=logits.dtype, device=logits.device))
        return logits

    def accept(self, token_id: int) -> None:
        self.out.append(int(token_id))


def copy_bias(source: Sequence[int], bias: float = 4.0, max_ngram: int = 8, min_ngram: int = 1) -> Callable[[], CopyBias]:
    """A factory for ``SamplingParams.logits_processors`` (one fresh :class:`CopyBias` per sequence)."""
    src = list(source)
    return lambda: CopyBias(src, bias, max_ngram, min_ngram)


__all__ = ["CopyBias", "copy_bias"]
