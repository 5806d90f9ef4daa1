"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Every engine step :meth:`Scheduler.schedule` builds one batch of at most ``max_num_batched_tokens``
query tokens: first the running sequences (one decode token each, or the next chunk of an unfinished
prefill), oldest first, then new or preempted sequences from the waiting queue while budget, sequence
slots and KV blocks last. A long prompt is prefilled in chunks across steps, so decodes keep flowing.
When the KV pool runs dry the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed later (its full blocks usually come back from the
prefix cache). :meth:`Scheduler.update` appends sampled tokens, applies the stop rules and frees the
blocks of finished sequences. References: Yu et al. 2022 (Orca, iteration-level scheduling),
Agrawal et al. 2024 (Sarathi-Serve, chunked prefill), vLLM v1 scheduler.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lmstack.serve.block_manager import BlockManager
from lmstack.serve.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= num_computed_tokens before the step)
    num_tokens: int  # query tokens this step

    @property
    def needs_sample(self) -> bool:
        """True when this step reaches the end of the sequence's tokens (its logits give the next token)."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler (KV pool too small)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: set[int]):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: dict[int, ScheduledSeq] = {}
        # decodes first (oldest first), then unfinished prefill chunks: a long prompt never starves decodes
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            ok = self.bm.ensure_slots(seq, seq.num_computed_tokens + n)
            while not ok:
                victim = self.running[-1]  # the newest request gives its blocks back
                if victim is seq:
                    break
                if victim.seq_id in scheduled:
                    budget += scheduled.pop(victim.seq_id).num_tokens
                self._preempt(victim, out)
                ok = self.bm.ensure_slots(seq, seq.num_computed_tokens + n)
            if not ok:
                if len(self.running) == 1:  # alone and still no room: the pool is too small for it
                    self.running.remove(seq)
                    self.bm.free_seq(seq)
                    if seq.detok is not None:
                        seq.detok.flush()
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "length"
                    out.finished.append(seq)
                else:
                    self._preempt(seq, out)
                continue
            scheduled[seq.seq_id] = ScheduledSeq(seq, seq.num_computed_tokens, n)
            budget -= n
        out.scheduled = list(scheduled.values())
        if out.preempted:  # the pool is full: admit nobody this step
            return out
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.index > 0 and not self._sibling_prefilled(seq):
                skipped.append(self.waiting.popleft())  # wait for completion 0 to fill the prefix cache
                continue
            if not seq.block_table:
                self.bm.match_prefix(seq)
                if seq.num_computed_tokens and seq.request.metrics.num_cached_prompt_tokens == 0:
                    seq.request.metrics.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.ensure_slots(seq, seq.num_computed_tokens + n):
                self.bm.free_seq(seq)  # give back the matched prefix blocks
                if not self.running and not out.scheduled:  # even an empty pool cannot hold it
                    self.waiting.popleft()
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "length"
                    out.finished.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = time.time()
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return out

    @staticmethod
    def _sibling_prefilled(seq: Sequence) -> bool:
        first = seq.request.seqs[0]
        return first.is_finished or first.num_computed_tokens >= first.num_prompt_tokens

    # ------------------------------------------------------------------ update
    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens (seq_id -> token), apply stop rules.

        Returns the sequences that finished in this step."""
        finished: list[Sequence] = list(out.finished)
        for s in out.scheduled:
            seq = s.seq
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.num_computed_tokens = s.start + s.num_tokens
            self.bm.register_computed(seq)
            tok = sampled.get(seq.seq_id)
            if tok is None:
                continue
            seq.token_ids.append(tok)
            reason = self._check_stop(seq, tok)
            if reason is not None:
                self.finish(seq, *reason)
                finished.append(seq)
        return finished

    def _check_stop(self, seq: Sequence, tok: int) -> tuple[str, str | int | None] | None:
        """(finish_reason, stop_reason) if ``tok`` ends the sequence. EOS / stop ids are masked in the
        sampler until ``min_tokens``; their text is never added to the output."""
        p = seq.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            if seq.detok is not None:
                seq.detok.flush()
            return "stop", (tok if tok in p.stop_token_ids else None)
        if seq.detok is not None:
            stop_str = seq.detok.step(tok)
            if stop_str is not None:
                return "stop", stop_str
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            if seq.detok is not None:
                stop_str = seq.detok.flush()
                if stop_str is not None:
                    return "stop", stop_str
            return "length", None
        return None

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason  # type: ignore[assignment]
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free_seq(seq)
