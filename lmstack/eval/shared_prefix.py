"""Score several continuations of one context with a single pass over the context.

Multiple choice with option texts (ARC / HellaSwag style), classification with verbalizers, and k-shot prompts
ask for log p(option | context) for 2-10 options that share a long context. Instead of running
``context + option`` once per option, the context runs once (its keys/values are recorded per layer, after
RoPE) and all option tails run together as one batch that attends to those cached keys. The numbers equal
the plain path: same tokens, same absolute positions, same causal visibility.

Layout of one tail batch (rows = requests, possibly from different contexts)::

    keys    [ prefix_0 .. prefix_{Pmax-1} | tail_0 .. tail_{T-1} ]   prefix slots past a row's P are masked
    queries                                 tail_0 .. tail_{T-1}     at positions P_row + i (RoPE)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lmstack.model.attention import sdpa


class _Record:
    """Causal attention over a right-padded batch that keeps each layer's (k, v) (B, n_kv, T, D)."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.kv[layer_idx] = (k, v)
        return sdpa(q, k, v, is_causal=True)


class _AfterPrefix:
    """Tail tokens attending to per-row cached prefix keys (B, n_kv, Pmax, D) and causally to each other."""

    def __init__(self, pk: list[Tensor], pv: list[Tensor], prefix_valid: Tensor, T: int):
        self.pk, self.pv = pk, pv
        B, Pmax = prefix_valid.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=prefix_valid.device).tril()
        self.mask = torch.cat([prefix_valid[:, None, None, :].expand(B, 1, T, Pmax),
                               causal[None, None].expand(B, 1, T, T)], dim=-1)  # (B, 1, T, Pmax + T)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k = torch.cat([self.pk[layer_idx], k], dim=2)
        v = torch.cat([self.pv[layer_idx], v], dim=2)
        return sdpa(q, k, v, self.mask)


@torch.no_grad()
def score_groups(model, groups: Sequence[tuple[list[int], list[list[int]]]], batch_tokens: int = 8192,
                 progress_cb=None) -> list[list[tuple[float, bool]]]:
    """For each (prefix, [continuation, ...]) group: (sum log p(cont | prefix), greedy?) per continuation.

    prefix: >= 1 token ids; continuations: >= 1 token ids each. Prefix + continuation must fit the model."""
    dev = model.device
    out: list[list[tuple[float, bool]]] = [[] for _ in groups]
    order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0]))
    start = 0
    while start < len(order):
        # a chunk of groups whose prefixes fit the token budget as one batch
        Pmax = len(groups[order[start]][0])
        n = max(1, min(64, batch_tokens // max(Pmax, 1)))
        chunk = order[start:start + n]
        start += len(chunk)
        ids = torch.zeros(len(chunk), Pmax, dtype=torch.long)
        for b, g in enumerate(chunk):
            ids[b, :len(groups[g][0])] = torch.tensor(groups[g][0])
        rec = _Record()
        h = model.hidden_states(ids.to(dev), ctx=rec)  # (G, Pmax, hidden)
        first: dict[int, Tensor] = {}  # group -> log-softmax at its last prefix position (V,)
        for b, g in enumerate(chunk):
            first[g] = torch.log_softmax(model.lm_head(h[b, len(groups[g][0]) - 1]).float(), -1).cpu()
        rows = [(b, g, j) for b, g in enumerate(chunk) for j in range(len(groups[g][1]))]
        res: dict[tuple[int, int], tuple[float, bool]] = {}
        T = max(len(groups[g][1][j]) - 1 for _, g, j in rows)
        if T == 0:  # every continuation is one token: the prefix pass answered everything
            for _, g, j in rows:
                t = groups[g][1][j][0]
                res[(g, j)] = (float(first[g][t]), bool(first[g].argmax() == t))
        else:
            per = max(1, batch_tokens // (Pmax + T))
            for s in range(0, len(rows), per):
                part = rows[s:s + per]
                B = len(part)
                tail = torch.zeros(B, T, dtype=torch.long)
                pos = torch.zeros(B, T, dtype=torch.long)
                valid = torch.zeros(B, Pmax, dtype=torch.bool)
                for r, (b, g, j) in enumerate(part):
                    P, c = len(groups[g][0]), groups[g][1][j]
                    tail[r, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    pos[r] = torch.arange(P, P + T)
                    valid[r, :P] = True
                sel = torch.tensor([b for b, _, _ in part], device=dev)
                pk = [rec.kv[i][0].index_select(0, sel) for i in range(len(rec.kv))]
                pv = [rec.kv[i][1].index_select(0, sel) for i in range(len(rec.kv))]
                ctx = _AfterPrefix(pk, pv, valid.to(dev), T)
                ht = model.hidden_states(tail.to(dev), position_ids=pos.to(dev), ctx=ctx)  # (B, T, hidden)
                for r, (b, g, j) in enumerate(part):
                    c = groups[g][1][j]
                    lp0 = first[g]
                    score, greedy = float(lp0[c[0]]), bool(lp0.argmax() == c[0])
                    if len(c) > 1:
                        lp = torch.log_softmax(model.lm_head(ht[r, :len(c) - 1]).float(), -1).cpu()  # (c-1, V)
                        tgt = torch.tensor(c[1:])
                        score += float(lp.gather(1, tgt[:, None]).sum())
                        greedy = greedy and bool((lp.argmax(-1) == tgt).all())
                    res[(g, j)] = (score, greedy)
        for g in chunk:
            out[g] = [res[(g, j)] for j in range(len(groups[g][1]))]
        if progress_cb is not None:
            progress_cb(len(rows))
    return out
