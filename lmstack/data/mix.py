"""Mixing: weighted sampling across sources to a document or (estimated) token budget.

Each source ``s`` with weight ``w_s`` gets the target share ``budget * w_s / sum(w)``. Its sampling rate is
``target / available``: below 1 a seeded per-document coin keeps a ``rate`` fraction; above 1 (and when
``allow_upsample``) documents repeat ``floor(rate)`` times plus one more with probability ``rate - floor``.
Decisions hash ``(seed, document id)``, so they are deterministic and independent of worker or shard count.
This is the temperature-free form of the mixing used by e.g. The Pile and Dolma "sampling ratios".
"""

from __future__ import annotations

import hashlib
import math

from lmstack.data.config import MixConfig


def mix_rates(docs: dict[str, int], chars: dict[str, int], weights: dict[str, float], cfg: MixConfig
              ) -> dict[str, float]:
    """Sampling rate per source (1.0 keeps everything once)."""
    live = {s: w for s, w in weights.items() if docs.get(s, 0) > 0}
    total_w = sum(live.values())
    rates = {s: 0.0 for s in weights}
    if total_w <= 0:
        return rates
    for s, w in live.items():
        share = w / total_w
        if cfg.budget_documents is not None:
            rate = cfg.budget_documents * share / docs[s]
        else:
            tokens = chars[s] / cfg.chars_per_token
            rate = (cfg.budget_tokens or 0) * share / max(tokens, 1e-9)
        rates[s] = rate if cfg.allow_upsample else min(rate, 1.0)
    return rates


def repeats(doc_id: str, rate: float, seed: int) -> int:
    """How many times the document appears in the mix (0, 1, 2, ...)."""
    if rate <= 0:
        return 0
    whole = math.floor(rate)
    frac = rate - whole
    if frac == 0:
        return whole
    u = int.from_bytes(hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest(), "little") / 2**64
    return whole + (1 if u < frac else 0)
