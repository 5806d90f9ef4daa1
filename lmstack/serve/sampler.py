"""Next-token choice per sequence: penalties, temperature, top-k / top-p / min-p, seeded sampling.

Order of operations follows ``transformers`` ``generate`` (so it can be tested against its logits
processors): repetition penalty (CTRL, Keskar et al. 2019: over prompt + output, positive logits divided,
negative multiplied) -> presence / frequency penalties (OpenAI, over output tokens) -> min_tokens
(EOS and stop ids masked) -> temperature -> top-k -> top-p (nucleus, Holtzman et al. 2020) ->
min-p (Nguyen et al. 2024) -> sample. Temperature 0 is greedy (argmax of the penalised logits).
Before all of that each sequence's logits processors run (``lmstack.serve.logits``: ``logit_bias``, grammar
masks). Each seeded sequence draws from its own ``torch.Generator``, so its text does not depend on what else is
in the batch. Log-probs are those of the distribution after the processors (log_softmax of the processed logits:
the model's raw distribution when a request has none, the constrained one under a grammar), before penalties.

A row that cannot be sampled (NaN or +inf logits, or no finite logit at all after the processors, or a
distribution that temperature made non-finite) gets :data:`NON_FINITE` instead of a token, and only that row:
the engine finishes that sequence with ``finish_reason`` "error" while the rest of the batch goes on (one broken
request used to fail ``torch.multinomial`` and with it every request of the step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmstack.serve.logits import apply_processors
from lmstack.serve.sequence import Sequence
from lmstack.serve.types import SamplingParams, TokenLogprob

NON_FINITE = -1  # the "token" of a row whose logits cannot be sampled (see the module docstring)


def unusable_rows(logits: Tensor) -> Tensor:
    """(B,) bool: rows with a NaN or +inf logit, or with no finite one (the max of the row is then NaN, +inf or
    -inf: one reduction). -inf entries alone are fine: they are masked tokens."""
    return ~torch.isfinite(logits.amax(-1))


def apply_penalties(logits: Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> Tensor:
    """In place on ``logits`` (B, V) for the rows whose params ask for it."""
    V = logits.shape[1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device).unique()
            x = logits[i, seen]
            logits[i, seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=V)[:V].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
            banned = [t for t in banned if 0 <= t < V]
            if banned:
                logits[i, banned] = float("-inf")
    return logits


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Temperature, top-k, top-p, min-p on (B, V) logits with per-row parameters (B,); returns logits with
    removed tokens at -inf. top_k 0 / top_p 1 / min_p 0 leave a row unchanged."""
    logits = logits / temperature[:, None]
    B, V = logits.shape
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        ranks = torch.arange(V, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, V)[:, None]
        remove = ranks >= k  # (B, V) in sorted order
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        probs = sorted_logits.softmax(-1)
        # nucleus: drop a token once the tokens before it already hold top_p of the mass (as transformers)
        before = probs.cumsum(-1) - probs
        remove |= (before >= top_p[:, None]) & (top_p[:, None] < 1) & (ranks > 0)
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        thresh = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


class Sampler:
    def __init__(self, eos_token_ids: set[int], device: torch.device):
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.default_generator = torch.Generator(device=device)
        self.default_generator.seed()

    @staticmethod
    def make_generator(params: SamplingParams, index: int, device: torch.device) -> torch.Generator | None:
        """A generator for completion ``index`` of a request with ``params.seed`` (None when unseeded)."""
        if params.seed is None or params.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(params.seed + index)

    @torch.inference_mode()
    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (B, V) fp32 -> the chosen token per row and its log-prob record (None if not asked);
        :data:`NON_FINITE` (and no log-prob) for a row that cannot be sampled."""
        B = logits.shape[0]
        logits = apply_processors(logits, seqs)  # logit_bias, grammar masks: a copy when any ran
        bad = unusable_rows(logits)
        any_bad = bool(bad.any())
        if any_bad:  # sample the others as usual; these rows are placeholders, their choice is thrown away
            logits = logits.masked_fill(bad[:, None], 0.0)
        want_lp = [s.params.logprobs is not None for s in seqs]
        raw_lp = logits.log_softmax(-1) if any(want_lp) else None  # (B, V)
        if any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
               or s.params.min_tokens for s in seqs):
            before = logits
            logits = apply_penalties(logits.clone(), seqs, self.eos_token_ids)
            if any(s.processors for s in seqs):  # min_tokens banning the only ends a grammar allows: keep them
                dead = ~torch.isfinite(logits).any(-1)
                if bool(dead.any()):
                    logits[dead] = before[dead]
            after = unusable_rows(logits)  # a penalty that left no finite logit
            if bool(after.any()):
                bad |= after
                any_bad = True
                logits = logits.masked_fill(after[:, None], 0.0)
        greedy = [s.params.temperature == 0 for s in seqs]
        if all(greedy):
            chosen = logits.argmax(-1).tolist()
        else:
            chosen = [0] * B
            if any(greedy):
                am = logits.argmax(-1).tolist()
                for i, g in enumerate(greedy):
                    if g:
                        chosen[i] = am[i]
            rows = [i for i, g in enumerate(greedy) if not g]
            sub = [seqs[i].params for i in rows]
            dev = logits.device
            filtered = filter_logits(
                logits[rows],
                torch.tensor([p.temperature for p in sub], device=dev, dtype=logits.dtype),
                torch.tensor([p.top_k for p in sub], device=dev, dtype=torch.long),
                torch.tensor([p.top_p for p in sub], device=dev, dtype=logits.dtype),
                torch.tensor([p.min_p for p in sub], device=dev, dtype=logits.dtype),
            )
            broken = unusable_rows(filtered)  # temperature can overflow float32 (a logit / 1e-5 past 3.4e38)
            if bool(broken.any()):
                bad[torch.tensor(rows, device=bad.device)[broken]] = True
                any_bad = True
                filtered = filtered.masked_fill(broken[:, None], 0.0)
            probs = filtered.softmax(-1)  # (R, V)
            skip = set(bad.nonzero().flatten().tolist()) if any_bad else ()
            for j, i in enumerate(rows):
                if i in skip:
                    continue
                g = seqs[i].generator or self.default_generator
                chosen[i] = int(torch.multinomial(probs[j], 1, generator=g))
        if any_bad:
            for i in bad.nonzero().flatten().tolist():
                chosen[i] = NON_FINITE
        lps: list[TokenLogprob | None] = [None] * B
        if raw_lp is not None:
            for i, s in enumerate(seqs):
                if not want_lp[i] or chosen[i] == NON_FINITE:
                    continue
                top: dict[int, float] = {}
                if s.params.logprobs:
                    v, ix = raw_lp[i].topk(s.params.logprobs)
                    top = {t: x for t, x in zip(ix.tolist(), v.tolist()) if x != float("-inf")}  # masked: no
                lps[i] = TokenLogprob(chosen[i], float(raw_lp[i, chosen[i]]), top)
        return chosen, lps
