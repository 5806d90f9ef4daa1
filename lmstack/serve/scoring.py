"""Scoring beside the engine: prompt log-probs (``echo`` + ``logprobs`` on ``/v1/completions``) and mean-pooled
embeddings (``/v1/embeddings``).

Both are one plain causal forward pass over the prompt with the engine's model (no KV cache, no batch slot): the
weights are only read, so it runs in a worker thread beside the engine's own steps. A prompt-tuning or prefix
adapter's KV prefix is not applied here (the engine refuses those models for scoring rather than give other
numbers than generation sees). lm-evaluation-harness's ``local-completions`` model scores loglikelihood tasks with
exactly this: ``echo: true, logprobs: 1, max_tokens: 1`` and ``token_logprobs[ctxlen:-1]``.
"""

from __future__ import annotations

import torch

from lmstack.serve.types import TokenLogprob

CHUNK = 512  # positions per lm_head + log_softmax call: (CHUNK, V) floats at a time, not (T, V)


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Log-prob of each prompt token given the ones before it (None for the first), with the top ``k``."""
    x = torch.tensor([ids], device=model.device)
    h = model.hidden_states(x)[0]  # (T, hidden)
    out: list[TokenLogprob | None] = [None]
    for a in range(0, len(ids) - 1, CHUNK):
        b = min(a + CHUNK, len(ids) - 1)
        lp = model.lm_head(h[a:b]).float().log_softmax(-1)  # (b - a, V): position i predicts token i + 1
        nxt = torch.tensor(ids[a + 1:b + 1], device=lp.device)
        chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
        tops = lp.topk(k, -1) if k else None
        for j in range(b - a):
            top = dict(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops is not None else {}
            out.append(TokenLogprob(ids[a + 1 + j], chosen[j], top))
    return out


@torch.inference_mode()
def mean_embedding(model, ids: list[int]) -> list[float]:
    """The mean over positions of the final (normed) hidden state: one vector of ``hidden_size`` floats."""
    x = torch.tensor([ids], device=model.device)
    return model.hidden_states(x)[0].float().mean(0).tolist()
