"""Rollouts through lmstack's serving engine, and the training forward that scores them again.

The policy generates with the same :class:`~lmstack.serve.engine.LLMEngine` as ``lmstack.load().generate``
and the HTTP server (paged KV cache, batched sampling, per-request seeds). The engine holds the policy
module itself, not a copy: each rollout uses the current weights. Two details keep that true:

* **no prefix caching** -- a cached KV block of a prompt was computed by older weights;
* **the engine's fused q/k/v and gate/up buffers are views of the parameters** (``fuse_projections``), so the
  optimizer's in-place updates reach them; LoRA wrappers take the unfused path.

Sampling log-probs come from the engine (``logprobs=0``: the chosen token's log-prob under the untempered
distribution). :func:`response_logps` recomputes them with a training forward pass (the classic RL bug is
these two disagreeing); tests/test_rl_rollout.py checks they are equal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lmstack.serve.engine import LLMEngine
from lmstack.serve.types import SamplingParams


@dataclass
class Rollout:
    """One sampled response: ``prompt_ids`` + ``response_ids`` and the engine's log-prob of each response
    token; ``record`` is the prompt's data row (what a verifiable reward reads: the answer, the tests)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logps: list[float]
    text: str = ""
    finish_reason: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    group: int = 0  # the index of its prompt in the batch (GRPO groups)


def make_engine(model: nn.Module, tokenizer: Any, *, max_num_seqs: int, max_model_len: int,
                kv_cache_memory: int) -> LLMEngine:
    """A rollout engine on ``model`` itself (no copy, no prefix cache, eager decode path)."""
    eng = LLMEngine(model, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                    kv_cache_memory=kv_cache_memory, enable_prefix_caching=False, use_kernel=False)
    return eng


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def generate(engine: LLMEngine, prompts: list[list[int]], records: list[dict[str, Any]], *, n: int,
             max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int | None = None
             ) -> list[Rollout]:
    """``n`` responses per prompt, in prompt order (a prompt's group is consecutive).

    The engine seeds response j of a request with ``seed + j``; prompt i gets ``seed + i·n``, so no two
    responses of one call share a random stream (``seed + i`` would make prompt i+1's samples a shifted copy
    of prompt i's). Callers advance ``seed`` by ``len(prompts)·n`` per call."""
    ids = []
    for i, p in enumerate(prompts):
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                logprobs=0, seed=None if seed is None else seed + i * n, skip_special_tokens=True)
        ids.append(engine.add_request(list(p), params).request_id)
    done: dict[str, Any] = {}
    model = engine.model
    with eval_mode(model), torch.no_grad():
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for rid in ids:
                if rid in engine.requests:
                    engine.abort_request(rid)
    rolls = []
    for g, (rid, p, rec) in enumerate(zip(ids, prompts, records)):
        for c in sorted(done[rid].outputs, key=lambda c: c.index):
            rolls.append(Rollout(list(p), list(c.token_ids), [lp.logprob for lp in (c.logprobs or [])], c.text,
                                 c.finish_reason, rec, g))
    return rolls


@dataclass
class RolloutBatch:
    """Rollouts as right-padded tensors: ``input_ids`` (B, L) prompt+response, ``attention_mask`` (B, L),
    ``positions`` (B, T): the index of the hidden state that predicts response token t, ``mask`` (B, T)."""

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor
    response_ids: Tensor
    mask: Tensor
    old_logps: Tensor  # (B, T) the engine's sampling log-probs

    def to(self, device: torch.device) -> "RolloutBatch":
        return RolloutBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def select(self, idx: Tensor) -> "RolloutBatch":
        return RolloutBatch(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def collate(rolls: list[Rollout], pad_id: int) -> RolloutBatch:
    B = len(rolls)
    L = max(len(r.prompt_ids) + len(r.response_ids) for r in rolls)
    T = max(1, max(len(r.response_ids) for r in rolls))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    resp = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    old = torch.zeros((B, T))
    for b, r in enumerate(rolls):
        full = r.prompt_ids + r.response_ids
        ids[b, :len(full)] = torch.tensor(full)
        attn[b, :len(full)] = 1
        n, P = len(r.response_ids), len(r.prompt_ids)
        pos[b, :n] = torch.arange(P - 1, P - 1 + n)
        resp[b, :n] = torch.tensor(r.response_ids, dtype=torch.long)
        mask[b, :n] = 1.0
        if r.logps:
            old[b, :n] = torch.tensor(r.logps[:n])
    return RolloutBatch(ids, attn, pos, resp, mask, old)


def response_hidden(model: nn.Module, batch: RolloutBatch) -> Tensor:
    """Final hidden states (B, T, H) at the positions that predict each response token."""
    core = getattr(model, "base", model)
    mask = batch.attention_mask
    h = core.hidden_states(batch.input_ids, attention_mask=None if bool(mask.all()) else mask)  # (B, L, H)
    return h.gather(1, batch.positions[..., None].expand(-1, -1, h.shape[-1]))


def logps_from_hidden(model: nn.Module, h: Tensor, batch: RolloutBatch, temperature: float = 1.0,
                      entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs (B, T) of the response tokens, and optionally the policy entropy per token (no grad)."""
    core = getattr(model, "base", model)
    logits = core.lm_head(h).float()  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, -1)
    lp = logits.gather(-1, batch.response_ids[..., None]).squeeze(-1) - lse
    ent = None
    if entropy:
        with torch.no_grad():
            p = torch.softmax(logits, -1)
            ent = lse - (p * logits).sum(-1)
    return lp * batch.mask, ent


def response_logps(model: nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
    """The training forward's log-probs (B, T) of every response token (0 on padding)."""
    return logps_from_hidden(model, response_hidden(model, batch), batch, temperature)[0]
