"""Green-list logits watermark and its detector (Kirchenbauer et al. 2023, *A Watermark for Large Language
Models*, Algorithm 2 "soft red list" and section 4's z-test).

Generation: at each step, the previous ``context_width`` tokens (``t_{i-h} .. t_{i-1}``, h = 1 in the paper's
Algorithm 2) and a secret ``key`` seed a generator; it draws a random permutation of the vocabulary and the first
``int(gamma * |V|)`` ids are the *green list* ``G_i``. ``delta`` is added to the green ids' logits before
sampling, so green tokens become more likely without forbidding red ones.

Two seeding schemes (``scheme``):

* ``"lmstack"`` (default): seed = the first 8 bytes of SHA-256("key:t_{i-h},...,t_{i-1}"), so every context
  token counts (a wider context is harder to scrub by editing single tokens, and less robust to edits);
* ``"hf"``: ``transformers``' ``WatermarkLogitsProcessor`` / ``WatermarkDetector`` with
  ``seeding_scheme="lefthash"``: seed = key * t_{i-1} mod (2^64 - 1) (its lefthash seeds on the last token
  whatever its ``context_width``; the first ``context_width`` tokens are still not scored). Both draw the
  permutation with ``torch.randperm`` on a CPU generator, so the green lists -- and the z-scores -- are
  identical to transformers' (tested: tests/test_watermark_interop.py). transformers' ``selfhash`` is not
  implemented.

Detection (no model needed, only the token ids and the key): with ``T`` scored tokens and ``|s|_G`` of them green,

    z = (|s|_G - gamma * T) / sqrt(T * gamma * (1 - gamma))

which is approximately standard normal for text written without the watermark. Flag as watermarked when
``z >= z_threshold``; the one-sided false-positive rate is ``1 - Phi(z_threshold)`` (z = 4: 3.2e-5).

:class:`WatermarkProcessor` is a pure callable ``(token_ids_so_far, logits_row) -> logits_row``: the shape of a
per-request logits processor in a sampling loop (lmstack's engine applies such processors to each request's
row before sampling). The seed uses ``key * prev_token`` hashed through SHA-256, so it is the same on every
machine and independent of Python's hash randomisation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch


SCHEMES = ("lmstack", "hf")
MAX_CONTEXT_WIDTH = 16


def _seed(key: int, context: Sequence[int] | int, scheme: str = "lmstack") -> int:
    ctx = [int(context)] if isinstance(context, int) else [int(t) for t in context]
    if scheme == "hf":
        return (int(key) * ctx[-1]) % (2 ** 64 - 1)
    h = hashlib.sha256(f"{int(key)}:{','.join(map(str, ctx))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def green_list(context: Sequence[int] | int, vocab_size: int, gamma: float, key: int,
               scheme: str = "lmstack") -> torch.Tensor:
    """The green ids (sorted, int64) for the token after ``context`` (the previous token, or the previous
    ``context_width`` tokens, oldest first)."""
    g = torch.Generator().manual_seed(_seed(key, context, scheme))
    perm = torch.randperm(vocab_size, generator=g)
    return perm[: green_size(vocab_size, gamma)].sort().values


def check_params(gamma: float, delta: float, context_width: int, scheme: str) -> None:
    """ValueError naming the first bad watermark parameter."""
    if not 0 < gamma < 1:
        raise ValueError(f"watermark gamma must be in (0, 1), got {gamma}")
    if not (math.isfinite(delta) and 0 <= delta <= 100):
        raise ValueError(f"watermark delta must be in [0, 100], got {delta}")
    if not (isinstance(context_width, int) and 1 <= context_width <= MAX_CONTEXT_WIDTH):
        raise ValueError(f"watermark context_width must be an integer in [1, {MAX_CONTEXT_WIDTH}], got {context_width}")
    if scheme not in SCHEMES:
        raise ValueError(f"watermark scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def green_size(vocab_size: int, gamma: float) -> int:
    return max(1, min(vocab_size - 1, int(gamma * vocab_size)))


@dataclass
class WatermarkProcessor:
    """Adds ``delta`` to the green-list logits of each step, seeded by the last ``context_width`` tokens of
    ``token_ids`` (padded on the left with ``prompt_last`` when a sequence has fewer: the engine passes the
    prompt + generated ids, so the prompt's tail seeds the first tokens)."""

    vocab_size: int
    gamma: float = 0.25
    delta: float = 2.0
    key: int = 15485863  # the reference implementation's default hash key
    prompt_last: int = 0
    context_width: int = 1
    scheme: str = "lmstack"

    def __post_init__(self) -> None:
        check_params(self.gamma, self.delta, self.context_width, self.scheme)
        if self.vocab_size < 2:
            raise ValueError("watermark needs a vocabulary of at least 2 tokens")
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def greens(self, context: Sequence[int] | int) -> torch.Tensor:
        ctx = (int(context),) if isinstance(context, int) else tuple(int(t) for t in context)
        g = self._cache.get(ctx)
        if g is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            g = self._cache[ctx] = green_list(ctx, self.vocab_size, self.gamma, self.key, self.scheme)
        return g

    def context(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        w = self.context_width
        tail = [int(t) for t in token_ids[-w:]] if len(token_ids) else []
        return tuple([int(self.prompt_last)] * (w - len(tail)) + tail)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """``logits``: (V,) or (V_padded,) for the next token; returns a new row with the bias added."""
        out = logits.clone()
        out[self.greens(self.context(token_ids)).to(out.device)] += self.delta
        return out


@dataclass
class Detection:
    z: float
    green: int
    scored: int
    gamma: float
    p_value: float  # one-sided, normal approximation
    watermarked: bool


def z_score(green: int, scored: int, gamma: float) -> float:
    """Kirchenbauer et al. eq. (2): (|s|_G - gamma T) / sqrt(T gamma (1 - gamma))."""
    if scored <= 0:
        return 0.0
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def detect(token_ids: Sequence[int], vocab_size: int, *, gamma: float = 0.25, key: int = 15485863,
           z_threshold: float = 4.0, prompt_last: int | None = None, ignore_repeated: bool = False,
           context_width: int = 1, scheme: str = "lmstack") -> Detection:
    """Count green tokens in ``token_ids`` (each scored against the ``context_width`` tokens before it; the
    first ``context_width`` are not scored unless ``prompt_last`` pads their context, as at generation) and
    return the z-test. ``ignore_repeated``: score each (context, token) n-gram once, which guards against
    repeated n-grams inflating z (the paper's later variant; transformers' ``ignore_repeated_ngrams``)."""
    check_params(gamma, 0.0, context_width, scheme)
    ids = [int(t) for t in token_ids]
    w = context_width
    if prompt_last is not None:
        ids = [int(prompt_last)] * w + ids
    grams = [(tuple(ids[i - w:i]), ids[i]) for i in range(w, len(ids))]
    if ignore_repeated:
        grams = list(dict.fromkeys(grams))
    cache: dict[tuple[int, ...], set[int]] = {}
    green = 0
    for ctx, tok in grams:
        if ctx not in cache:
            cache[ctx] = set(green_list(ctx, vocab_size, gamma, key, scheme).tolist())
        green += tok in cache[ctx]
    z = z_score(green, len(grams), gamma)
    p = 0.5 * math.erfc(z / math.sqrt(2))
    return Detection(round(z, 4), green, len(grams), gamma, p, z >= z_threshold)


def false_positive_rate(z_threshold: float) -> float:
    """1 - Phi(z): the chance that text without the watermark reaches ``z_threshold`` (normal approximation)."""
    return 0.5 * math.erfc(z_threshold / math.sqrt(2))


class EngineWatermark:
    """:class:`WatermarkProcessor` in the shape of the engine's per-sequence logits processor
    (``__call__(logits, seq) -> logits``, ``accept(token_id)``, ``satisfied``): it remembers the tokens the
    sequence took, so it needs nothing from ``seq``. One instance per sequence: pass
    :func:`watermark_factory`'s result where the engine takes processor factories."""

    satisfied = None  # not a constraint

    def __init__(self, processor: WatermarkProcessor):
        self.processor = processor
        self.tokens: list[int] = []

    def __call__(self, logits: torch.Tensor, seq: object = None) -> torch.Tensor:
        ids = getattr(seq, "token_ids", None)  # the engine's sequence: prompt + generated ids
        return self.processor(ids if ids is not None else self.tokens, logits)

    def accept(self, token_id: int) -> None:
        self.tokens.append(int(token_id))


def watermark_factory(vocab_size: int, *, gamma: float = 0.25, delta: float = 2.0, key: int = 15485863,
                      prompt_last: int = 0, context_width: int = 1, scheme: str = "lmstack"):
    """A zero-argument factory of :class:`EngineWatermark` (fresh state per sequence) for
    ``SamplingParams.logits_processors``. Parameters are checked here (ValueError), not at the first token."""
    WatermarkProcessor(vocab_size, gamma, delta, key, prompt_last, context_width, scheme)
    return lambda: EngineWatermark(WatermarkProcessor(vocab_size, gamma, delta, key, prompt_last, context_width,
                                                      scheme))
