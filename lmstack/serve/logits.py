"""The per-request logits step: processors applied to one sequence's logits row before sampling.

One small interface for everything that edits a request's next-token distribution — ``logit_bias``, grammar
constraints (``lmstack.serve.structured``), Python-syntax guarding, and later watermarks, guardrails and
speculative decoding's draft checks. A :class:`LogitsProcessor` belongs to ONE sequence (each of a request's
``n`` completions gets its own, built by the factories in ``SamplingParams.logits_processors``):

* ``__call__(logits, seq)`` edits the row ``(V,)`` of fp32 logits (in place or returning a new tensor) before
  the penalties, temperature and top-k/p; the engine calls the processors in order;
* ``accept(token_id)`` is told each token the sequence takes (after sampling, before the next forward pass),
  which is where a stateful processor advances — and may start computing its next mask on a worker thread so
  the work overlaps the next forward pass instead of stalling the batch;
* ``satisfied`` is None for a processor that does not constrain the output, else whether the output so far is
  a complete instance of its constraint (a grammar in an accepting state); it is reported on each completion
  (``CompletionOutput.constraint_satisfied``) so a client knows a ``length`` finish cut a JSON object short.

Log-probs returned to the client are those of the distribution AFTER the processors (the constrained one),
before penalties and temperature (``lmstack.serve.sampler``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

NEG_INF = float("-inf")


@runtime_checkable
class LogitsProcessor(Protocol):
    satisfied: bool | None

    def __call__(self, logits: Tensor, seq: Any) -> Tensor: ...  # (V,) fp32 -> (V,)

    def accept(self, token_id: int) -> None: ...


# What SamplingParams carries: one factory per processor, called once per sequence (n > 1 gets fresh state).
LogitsProcessorFactory = Callable[[], LogitsProcessor]


class LogitBias:
    """OpenAI's ``logit_bias``: add a fixed value to chosen token ids (-100 bans a token, +100 all but forces it)."""

    satisfied = None

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, logits: Tensor, seq: Any) -> Tensor:
        ids = self.ids.to(logits.device)
        logits.index_add_(0, ids, self.values.to(logits.device, logits.dtype))
        return logits

    def accept(self, token_id: int) -> None:
        pass


def apply_processors(logits: Tensor, seqs: list[Any]) -> Tensor:
    """Run each sequence's processors on its row of ``logits`` (B, V); returns logits (a copy when any ran).
    A row the processors mask entirely (every logit -inf) keeps only the end-of-sequence tokens the sequence may
    end on (``seq.end_ids``), or is left as it came; a NaN / +inf row is left to the sampler, which finishes
    that sequence alone with ``finish_reason`` "error"."""
    if not any(s.processors for s in seqs):
        return logits
    src, logits = logits, logits.clone()  # the processors edit the copy; src keeps each row as it came
    for i, seq in enumerate(seqs):
        if not seq.processors:
            continue
        orig = src[i]
        row = logits[i]
        for p in seq.processors:
            row = p(row, seq)
        if bool((row == NEG_INF).all()):  # all masked (NaN / +inf rows go on: the sampler finishes them "error")
            fallback = torch.full_like(row, NEG_INF)
            ends = [t for t in getattr(seq, "end_ids", ()) if 0 <= t < row.shape[0]]
            if ends:
                fallback[ends] = 0.0
                row = fallback
            else:
                row = orig
        logits[i] = row
    return logits


class CopyBias:
    """Grounded decoding: a soft copy mechanism for answers from retrieved texts.

    While the sequence's last ``n`` output tokens (the longest suffix of at most ``max_n``, at least ``min_n``
    tokens) occur in one of the ``source`` texts, every token that follows them there gets ``bias`` added to its
    logit; at the first output token, the first token of every text gets ``start_bias``. The model still
    chooses every token -- which text to quote, whether to quote at all, when to stop; the bonus only makes
    staying on a source's wording cheaper than paraphrasing it ("... *comes with* a 1-year warranty" for "...
    *has* a 1-year warranty": harmless to a reader, fatal to exact answers, prices and numbers). It is the copy
    distribution of pointer-generator networks (See et al. 2017) reduced to a logit bonus, with the n-gram
    lookup of prompt-lookup decoding.

    ``source``: one token-id list per quotable text (the retrieved passages' answer units, not the whole
    prompt: the question itself is not something to quote). Matches never run across two texts, so a quote
    ends where its text ends. O(max_n) dictionary lookups per token.

    ``weights``: one more bonus per text (default 0), added to both bonuses for the tokens that text offers; a
    token several texts offer gets the largest. With ``weights = log p(text)`` from a ranker over the texts (a
    softmax's logits minus their maximum), decoding becomes a product of experts: the model's distribution times
    the ranker's, at the tokens where the candidate quotes part ways (reader-guided decoding)."""

    satisfied = None  # a soft prior: it never constrains the output

    def __init__(self, source: list[list[int]], bias: float = 4.0, max_n: int = 4, min_n: int = 1,
                 start_bias: float = 0.0, weights: Sequence[float] | None = None):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"copy bias needs 1 <= min_n <= max_n, got {min_n}, {max_n}")
        if weights is not None and len(weights) != len(source):
            raise ValueError(f"copy bias got {len(weights)} weights for {len(source)} texts")
        self.bias, self.max_n, self.min_n, self.start_bias = float(bias), max_n, min_n, float(start_bias)
        # n-gram of a text -> {token that follows it there: the largest weight of a text where it does}
        self.next: dict[tuple[int, ...], dict[int, float]] = {}
        self.first: dict[int, float] = {}
        ws = [0.0] * len(source) if weights is None else [float(w) for w in weights]
        self.texts, self.weights = [list(ids) for ids in source], ws
        for ids, w in zip(source, ws):
            if ids:
                self.first[ids[0]] = max(w, self.first.get(ids[0], -math.inf))
            for j in range(1, len(ids)):
                for n in range(min_n, min(max_n, j) + 1):
                    follow = self.next.setdefault(tuple(ids[j - n:j]), {})
                    follow[ids[j]] = max(w, follow.get(ids[j], -math.inf))
        self.out: list[int] = []
        self.nonempty = tuple(i for i, ids in enumerate(self.texts) if ids)
        self.quoting = list(self.nonempty)  # texts the whole output is a prefix of

    def followers(self, generated: list[int]) -> dict[int, float]:
        """The tokens that continue the longest suffix of ``generated`` found in a text, each with its weight
        (empty: none found). While the whole output is the start of some texts (it quotes them from their first
        token), only those texts' next tokens count: a match as long as the answer itself."""
        if generated is self.out and self.quoting and generated:
            n = len(generated)
            follow: dict[int, float] = {}
            for i in self.quoting:
                if n < len(self.texts[i]):
                    t = self.texts[i][n]
                    follow[t] = max(self.weights[i], follow.get(t, -math.inf))
            if follow:
                return follow
        for n in range(min(self.max_n, len(generated)), self.min_n - 1, -1):
            hit = self.next.get(tuple(generated[len(generated) - n:]))
            if hit:
                return hit
        return {}

    @staticmethod
    def _add(logits: Tensor, tokens: dict[int, float], bonus: float) -> None:
        V = logits.shape[0]
        ids = sorted(t for t in tokens if t < V)
        if ids:
            logits[torch.tensor(ids, dtype=torch.long, device=logits.device)] += torch.tensor(
                [bonus + tokens[t] for t in ids], dtype=logits.dtype, device=logits.device)

    def __call__(self, logits: Tensor, seq: Any = None) -> Tensor:
        if not self.out and self.first and (self.start_bias or any(self.first.values())):
            self._add(logits, self.first, self.start_bias)
        follow = self.followers(self.out)
        if follow:
            self._add(logits, follow, self.bias)
        return logits

    def fresh(self) -> "CopyBias":
        """The same texts for another sequence (the n-gram table shared, not rebuilt), with no output yet."""
        other = copy.copy(self)
        other.out = []
        other.quoting = list(self.nonempty)
        return other

    def accept(self, token_id: int) -> None:
        n = len(self.out)
        self.quoting = [i for i in self.quoting if n < len(self.texts[i]) and self.texts[i][n] == int(token_id)]
        self.out.append(int(token_id))
