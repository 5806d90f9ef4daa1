"""Green-list logits watermark and its detector (Kirchenbauer et al. 2023, *A Watermark for Large Language
Models*, Algorithm 2 "soft red list" and section 4's z-test).

Generation: at each step, the previous token ``t_{i-1}`` and a secret ``key`` seed a generator; it draws a random
permutation of the vocabulary and the first ``gamma * |V|`` ids are the *green list* ``G_i``. ``delta`` is added
to the green ids' logits before sampling, so green tokens become more likely without forbidding red ones.

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


def _seed(key: int, prev_token: int) -> int:
    h = hashlib.sha256(f"{int(key)}:{int(prev_token)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def green_list(prev_token: int, vocab_size: int, gamma: float, key: int) -> torch.Tensor:
    """The green ids (sorted, int64) for the token after ``prev_token``."""
    g = torch.Generator().manual_seed(_seed(key, prev_token))
    perm = torch.randperm(vocab_size, generator=g)
    return perm[: green_size(vocab_size, gamma)].sort().values


def green_size(vocab_size: int, gamma: float) -> int:
    return max(1, min(vocab_size - 1, int(gamma * vocab_size)))


@dataclass
class WatermarkProcessor:
    """Adds ``delta`` to the green-list logits of each step (the first token of a sequence, which has no
    predecessor in ``token_ids``, is seeded by ``prompt_last``)."""

    vocab_size: int
    gamma: float = 0.25
    delta: float = 2.0
    key: int = 15485863  # the reference implementation's default hash key
    prompt_last: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.gamma < 1:
            raise ValueError(f"watermark gamma must be in (0, 1), got {self.gamma}")
        if self.vocab_size < 2:
            raise ValueError("watermark needs a vocabulary of at least 2 tokens")
        self._cache: dict[int, torch.Tensor] = {}

    def greens(self, prev: int) -> torch.Tensor:
        g = self._cache.get(prev)
        if g is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            g = self._cache[prev] = green_list(prev, self.vocab_size, self.gamma, self.key)
        return g

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """``logits``: (V,) or (V_padded,) for the next token; returns a new row with the bias added."""
        prev = int(token_ids[-1]) if len(token_ids) else int(self.prompt_last)
        out = logits.clone()
        out[self.greens(prev).to(out.device)] += self.delta
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
           z_threshold: float = 4.0, prompt_last: int | None = None, ignore_repeated: bool = False) -> Detection:
    """Count green tokens in ``token_ids`` (each scored against its predecessor; the first one against
    ``prompt_last`` when given, else not scored) and return the z-test. ``ignore_repeated``: score each
    (previous, token) pair once, which guards against repeated n-grams inflating z (the paper's later variant)."""
    ids = [int(t) for t in token_ids]
    pairs = list(zip(ids[:-1], ids[1:]))
    if prompt_last is not None and ids:
        pairs.insert(0, (int(prompt_last), ids[0]))
    if ignore_repeated:
        pairs = list(dict.fromkeys(pairs))
    cache: dict[int, set[int]] = {}
    green = 0
    for prev, tok in pairs:
        if prev not in cache:
            cache[prev] = set(green_list(prev, vocab_size, gamma, key).tolist())
        green += tok in cache[prev]
    z = z_score(green, len(pairs), gamma)
    p = 0.5 * math.erfc(z / math.sqrt(2))
    return Detection(round(z, 4), green, len(pairs), gamma, p, z >= z_threshold)


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
        return self.processor(self.tokens, logits)

    def accept(self, token_id: int) -> None:
        self.tokens.append(int(token_id))


def watermark_factory(vocab_size: int, *, gamma: float = 0.25, delta: float = 2.0, key: int = 15485863,
                      prompt_last: int = 0):
    """A zero-argument factory of :class:`EngineWatermark` (fresh state per sequence)."""
    return lambda: EngineWatermark(WatermarkProcessor(vocab_size, gamma, delta, key, prompt_last))
