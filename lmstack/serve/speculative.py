"""Speculative decoding: a draft model proposes K tokens, the target verifies them in one forward pass.

    llm = lmstack.load("runs/sft/final", speculative_model="runs/sft/int4", num_speculative_tokens=4)
    lmstack serve --model DIR --speculative-model DIR2 --num-speculative-tokens 4

Each engine step in which every scheduled sequence is decoding (one pending token each) and none needs what the
rule below does not cover runs:

1. the draft model (its own paged KV cache, same vocabulary) catches up on the tokens it has not seen and
   proposes ``d_1..d_K`` one at a time, each drawn from its distribution ``q_i`` (argmax when greedy);
2. the target reads ``[last token, d_1..d_K]`` as one K+1-token chunk through its paged cache (one forward
   pass, the K/V of all K+1 positions written) and gives ``p_1..p_{K+1}``;
3. acceptance (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", alg. 1;
   Chen et al. 2023): ``d_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection
   a token is drawn from ``norm(max(0, p_i - q_i))`` and the rest is dropped; when all K are kept a bonus
   token is drawn from ``p_{K+1}``. Every emitted token is then distributed exactly as the target's own
   sample (:func:`accept`); greedy (temperature 0) keeps ``d_i`` iff it is the target's argmax, so the output
   is the target's greedy output.

``p`` and ``q`` are the sampling distributions after temperature / top-k / top-p / min-p
(:func:`lmstack.serve.sampler.filter_logits`), so those parameters keep their meaning. The tokens go through the
scheduler's stop rules one at a time (EOS, stop strings, max_tokens), and the target's KV slots past the kept
tokens are simply overwritten by later steps (positions never visible to anyone). A step falls back to the
ordinary one-token step, with the reason counted in :attr:`SpeculativeEngine.fallbacks`, when a sequence is
still prefilling or needs per-token state the rule does not carry: logits processors (structured output,
logit_bias), repetition / presence / frequency penalties or min_tokens, log-probs; or when the KV pool cannot
hold the K extra slots.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmstack.errors import ConfigError
from lmstack.model.transformer import Transformer
from lmstack.serve.block_manager import BlockManager
from lmstack.serve.engine import LLMEngine
from lmstack.serve.runner import ModelRunner, _sdpa_kernel, sdpa_backends
from lmstack.serve.sampler import filter_logits
from lmstack.serve.scheduler import ScheduledSeq
from lmstack.serve.sequence import Sequence
from lmstack.serve.types import RequestOutput, SamplingParams

MAX_SPECULATIVE_TOKENS = 16


# ---------------------------------------------------------------------------------------------- the rule
def probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """(R, V) sampling distributions of the rows (one SamplingParams each, temperature > 0)."""
    dev, dt = logits.device, logits.dtype
    f = filter_logits(logits.float(), torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32),
                      torch.tensor([p.top_k for p in params], device=dev, dtype=torch.long),
                      torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32),
                      torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float32))
    return f.softmax(-1).to(dt)


def accept(p: Tensor, q: Tensor, draft: list[int], generator: torch.Generator | None = None) -> list[int]:
    """The speculative sampling rule for one sequence. ``p`` (K+1, V): the target's distributions after the
    prefix and after each draft token; ``q`` (K, V): the draft's; ``draft``: the K proposed tokens.
    Returns the emitted tokens: the kept prefix of ``draft`` and one more (resampled at the first rejection,
    else drawn from ``p[K]``)."""
    K = len(draft)
    u = torch.rand(K, generator=generator, device=p.device) if K else None
    out: list[int] = []
    for i, d in enumerate(draft):
        pd, qd = float(p[i, d]), float(q[i, d])
        if qd > 0 and float(u[i]) * qd < pd:  # u < p/q, i.e. kept with probability min(1, p/q)
            out.append(d)
            continue
        resid = (p[i] - q[i]).clamp_min(0)
        s = float(resid.sum())
        dist = resid / s if s > 0 else p[i]  # s == 0 only when p == q, where rejection has probability 0
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[K], 1, generator=generator)))
    return out


def accept_greedy(target_argmax: list[int], draft: list[int]) -> list[int]:
    """Temperature 0: keep ``d_i`` while it is the target's argmax; then the target's argmax."""
    out: list[int] = []
    for i, d in enumerate(draft):
        if d != target_argmax[i]:
            break
        out.append(d)
    out.append(target_argmax[len(out)])
    return out


# ---------------------------------------------------------------------------------------------- the engine
@dataclass(eq=False)
class _Shadow:
    """What the runner reads of a sequence: its tokens and block table (a draft's, or a target's with the
    proposed tokens appended)."""
    token_ids: list[int]
    block_table: list[int]
    request: Any = None
    num_computed_tokens: int = 0
    num_hashed_blocks: int = 0
    block_hashes: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class SpeculativeEngine(LLMEngine):
    """:class:`LLMEngine` with a draft model: :meth:`step` runs the speculative step when it can (module doc)."""

    def __init__(self, model: Transformer, tokenizer: Any | None = None, *, draft_model: Transformer,
                 num_speculative_tokens: int = 4, draft_kv_cache_memory: int | None = None, **engine_kw: Any):
        if not 1 <= int(num_speculative_tokens) <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"--num-speculative-tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                              f"got {num_speculative_tokens}")
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({draft_model.config.vocab_size} tokens) differs from "
                              f"the target's ({model.config.vocab_size}); a draft must share the target's tokenizer")
        if draft_model.device != model.device:
            raise ConfigError(f"the draft model is on {draft_model.device}, the target on {model.device}")
        if engine_kw.get("prefix_kv") is not None:
            raise ConfigError("speculative decoding does not run with a prompt / prefix-tuning adapter")
        super().__init__(model, tokenizer, **engine_kw)
        self.k = int(num_speculative_tokens)
        self.draft_model = draft_model.eval()
        # the draft's own paged cache: as many token slots as the target's pool (+ K per sequence), no prefix
        # caching (its blocks live and die with the target's sequences)
        from lmstack.kernels import load_cpu_decode, mode as kernel_mode
        from lmstack.serve.runner import kernel_supported

        use = kernel_mode() != "off" and engine_kw.get("use_kernel") is not False \
            and kernel_supported(draft_model) is None and load_cpu_decode()
        if not use:
            draft_model.fuse_projections(column_major=True)
        per_block = ModelRunner.kv_bytes_per_block(draft_model, self.block_size)
        tokens = self.block_manager.num_blocks * self.block_size + self.scheduler.max_num_seqs * (self.k + 1)
        nb = draft_kv_cache_memory // per_block if draft_kv_cache_memory else -(-tokens // self.block_size) + 1
        self.draft_runner = ModelRunner(draft_model, int(nb), self.block_size, use_kernel=use)
        self.draft_bm = BlockManager(int(nb), self.block_size, enable_prefix_caching=False)
        self.draft_seqs: dict[int, _Shadow] = {}
        self.spec_stats = {"steps": 0, "proposed": 0, "accepted": 0, "emitted": 0, "kernel_verify": 0}
        self.fallbacks: Counter[str] = Counter()

    # ------------------------------------------------------------------ eligibility
    @staticmethod
    def _why_not(seq: Sequence) -> str | None:
        p = seq.params
        if seq.processors:
            return "logits processors (structured output, logit_bias)"
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.min_tokens:
            return "penalties or min_tokens"
        if p.logprobs is not None:
            return "log-probs"
        return None

    def stats(self) -> dict[str, float | int]:
        s = super().stats()
        st = self.spec_stats
        s.update({f"spec_{k}": v for k, v in st.items()})
        s["spec_acceptance_rate"] = st["accepted"] / st["proposed"] if st["proposed"] else 0.0
        return s

    def _free_drafts(self) -> None:
        """Give back the draft blocks of sequences that finished or were preempted."""
        for sid in [sid for sid, d in self.draft_seqs.items() if sid not in self._live]:
            self.draft_bm.free_seq(self.draft_seqs.pop(sid))

    @property
    def _live(self) -> set[int]:
        return {s.seq_id for s in self.scheduler.running}

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        self._free_drafts()
        out = self.scheduler.schedule()
        reason = None
        if not out.scheduled or out.finished or out.preempted:
            reason = "scheduler"
        elif any(s.num_tokens != 1 or not s.needs_sample for s in out.scheduled):
            reason = "prefill in the batch"
        else:
            reason = next((r for r in map(self._why_not, (s.seq for s in out.scheduled)) if r), None)
        if reason is None:
            res = self._speculate(out)
            if res is not None:
                return res
            reason = "KV pool full"
        self.fallbacks[reason] += 1
        return self._plain_step(out)

    def _plain_step(self, out) -> list[RequestOutput]:
        """LLMEngine.step on an already scheduled batch."""
        self.scheduler.schedule = lambda: out  # type: ignore[method-assign]
        try:
            return super().step()
        finally:
            del self.scheduler.schedule

    def _draft_shadow(self, seq: Sequence) -> _Shadow:
        d = self.draft_seqs.get(seq.seq_id)
        if d is None or d.token_ids[:d.num_computed_tokens] != seq.token_ids[:d.num_computed_tokens]:
            if d is not None:  # preempted and recomputed, or otherwise out of step: start over
                self.draft_bm.free_seq(d)
            d = self.draft_seqs[seq.seq_id] = _Shadow([], [], seq.request)
        d.token_ids = list(seq.token_ids)
        return d

    @torch.inference_mode()
    def _speculate(self, out) -> list[RequestOutput] | None:
        K = self.k
        seqs = [s.seq for s in out.scheduled]
        # the target needs slots for the K proposed tokens too; if the pool cannot give them, plain step
        for seq in seqs:
            if not self.block_manager.ensure_slots(seq, seq.num_tokens + K):
                return None
        drafts = [self._draft_shadow(seq) for seq in seqs]
        for d in drafts:
            if not self.draft_bm.ensure_slots(d, d.num_tokens + K):
                return None
        # a draft a few tokens behind (all K kept last step: 2) catches up one token per pass, so every pass is a
        # decode step the compiled kernel runs (a multi-token chunk would take the eager path, which dequantizes
        # an int8 / int4 draft layer by layer); a new sequence's prompt is one chunk in the first pass below
        full = [d.token_ids for d in drafts]
        while True:
            lag = [j for j, d in enumerate(drafts) if 1 < len(full[j]) - d.num_computed_tokens <= K + 1]
            if not lag:
                break
            for j in lag:
                drafts[j].token_ids = full[j][:drafts[j].num_computed_tokens + 1]
            self.draft_runner.run([ScheduledSeq(drafts[j], drafts[j].num_computed_tokens, 1) for j in lag])
            for j in lag:
                drafts[j].num_computed_tokens += 1
        for d, f in zip(drafts, full):
            d.token_ids = f
        greedy = [seq.params.temperature == 0 for seq in seqs]
        gens = [seq.generator for seq in seqs]
        proposed: list[list[int]] = [[] for _ in seqs]
        q_rows: list[list[Tensor]] = [[] for _ in seqs]
        # 1. the draft: catch up + K proposals (K forward passes, each one token per sequence after the first)
        for i in range(K):
            batch = [ScheduledSeq(d, d.num_computed_tokens, d.num_tokens - d.num_computed_tokens) for d in drafts]
            logits, rows = self.draft_runner.run(batch)
            for j, (d, r) in enumerate(zip(drafts, rows)):
                d.num_computed_tokens = d.num_tokens
                row = logits[r]
                if greedy[j]:
                    tok = int(row.argmax())
                else:
                    qd = probs(row[None], [seqs[j].params])[0]
                    q_rows[j].append(qd)
                    tok = int(torch.multinomial(qd, 1, generator=gens[j] or self.sampler.default_generator))
                proposed[j].append(tok)
                d.token_ids.append(tok)
        # 2. the target: [last token, d_1..d_K] of every sequence in one forward pass through its paged cache
        shadows = [_Shadow(seq.token_ids + prop, seq.block_table) for seq, prop in zip(seqs, proposed)]
        batch = [ScheduledSeq(sh, seq.num_computed_tokens, K + 1) for sh, seq in zip(shadows, seqs)]
        runner = self.runner
        if runner.kernel is not None and len(seqs) * (K + 1) <= runner.kernel_max_batch:
            # the compiled decode kernel writes every row's K/V before any row attends, so the K+1 consecutive
            # positions of a sequence run as K+1 one-token rows sharing its block table: the causal verification
            # pass costs about one decode step (the eager path's small-M matmuls cost ~5 of them on a CPU)
            rows = [ScheduledSeq(sh, seq.num_computed_tokens + i, 1) for sh, seq in zip(shadows, seqs)
                    for i in range(K + 1)]
            logits = runner.kernel(rows).view(len(seqs), K + 1, -1)
            self.spec_stats["kernel_verify"] += 1
        else:
            input_ids, position_ids, ctx, _ = runner.prepare(batch)
            backends = sdpa_backends(runner.device, ctx.masked)
            with contextlib.nullcontext() if backends is None else _sdpa_kernel(backends):
                h = self.model.hidden_states(input_ids, position_ids=position_ids, ctx=ctx)[0]  # (B (K+1), hidden)
            logits = self.model.lm_head(h).float().view(len(seqs), K + 1, -1)
        # 3. acceptance, then the tokens through the scheduler's stop rules one at a time
        now = time.time()
        finished: list[Sequence] = []
        st = self.spec_stats
        st["steps"] += 1
        for j, seq in enumerate(seqs):
            if greedy[j]:
                toks = accept_greedy(logits[j].argmax(-1).tolist(), proposed[j])
            else:
                p = probs(logits[j], [seq.params] * (K + 1))
                toks = accept(p, torch.stack(q_rows[j]), proposed[j], gens[j] or self.sampler.default_generator)
            kept = len(toks) - 1
            st["proposed"] += K
            st["accepted"] += kept
            if seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now
            if seq.request.aborted or seq.is_finished:
                continue
            # the target's cache holds the last token and the kept drafts; the draft's, the tokens it read
            # that are still the sequence's
            seq.num_computed_tokens += 1 + kept
            d = drafts[j]
            d.num_computed_tokens = min(d.num_computed_tokens, seq.num_computed_tokens)
            for t in toks:
                seq.token_ids.append(t)
                st["emitted"] += 1
                self.generation_tokens_total += 1
                reason = self.scheduler._check_stop(seq, t)
                if reason is not None:
                    self.scheduler.finish(seq, *reason)
                    finished.append(seq)
                    break
            if not seq.is_finished:
                self.block_manager.register_computed(seq)
        self._free_drafts()
        touched: dict[str, Any] = {}
        for seq in seqs + finished:
            touched[seq.request.request_id] = seq.request
        return self._outputs(touched)


def load_draft(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> Transformer:
    """A draft model directory (float or lmstack-quantized; a .gguf file is imported first)."""
    from lmstack.export.gguf_import import resolve_model_path
    from lmstack.quant.checkpoint import load_any

    return load_any(resolve_model_path(path), device=device, dtype=dtype)
