"""Batched generation for evaluation on lmstack's Transformer with a contiguous KV cache.

Prompts are left-padded to a common length; positions come from the padding mask (as ``transformers``
``generate`` does), so each row's numerics equal an unpadded run. Greedy when ``temperature == 0``, otherwise
temperature + nucleus (top-p, Holtzman et al. 2020) sampling from a seeded generator.
This is the evaluator's own small decoder; the serving engine (``lmstack.serve``) is the production path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lmstack.model.attention import KVCache


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # always keeps the most likely token
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_ids(model, prompts: Sequence[list[int]], *, max_tokens: int, eos_ids: Sequence[int] = (),
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 stop_check: Callable[[list[int]], bool] | None = None,
                 max_length: int | None = None) -> list[list[int]]:
    """New token ids per prompt (EOS excluded); stops a row at EOS, ``stop_check(ids)`` or ``max_tokens``."""
    cfg = model.config
    dev = model.device
    limit = max_length or cfg.max_position_embeddings
    prompts = [list(p[-max(1, limit - max_tokens):]) for p in prompts]  # keep room for the answer
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    cache = KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, cfg.head_dim, T + max_tokens,
                    model.dtype, dev, cfg.sliding_window)
    cache.set_padding(mask)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
    logits = model(ids, position_ids=pos, ctx=cache, logits_to_keep=1)[:, -1]  # (B, V)
    cache.advance(T)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    eos = set(eos_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_tokens):
        tok = _sample(logits, temperature, top_p, generator)  # (B,)
        for b in range(B):
            if done[b]:
                continue
            t = int(tok[b])
            if t in eos:
                done[b] = True
                continue
            out[b].append(t)
            if stop_check is not None and stop_check(out[b]):
                done[b] = True
        if all(done):
            break
        cache.set_padding(torch.ones(B, 1, dtype=torch.long, device=dev))
        logits = model(tok[:, None], position_ids=next_pos, ctx=cache)[:, -1]
        cache.advance(1)
        next_pos = next_pos + 1
    return out
