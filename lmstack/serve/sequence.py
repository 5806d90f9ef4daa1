"""Requests and sequences: the engine's bookkeeping units (vLLM's ``Request`` / ``Sequence``).

A :class:`Request` is what a caller submits (one prompt, one :class:`SamplingParams`); it owns ``n``
:class:`Sequence` objects, one per completion. The scheduler, block manager and runner work on
sequences: each has its own token list (prompt + generated), KV block table, sampling generator and
incremental detokenizer.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from lmstack.serve.detokenizer import IncrementalDetokenizer
from lmstack.serve.types import (
    CompletionOutput, FinishReason, RequestMetrics, RequestOutput, SamplingParams, TokenLogprob,
)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the batch (new, or preempted and to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading full blocks registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # the per-request logits step (lmstack.serve.logits): this sequence's own processors, and the ids it may
    # end on (a row the processors leave empty falls back to these)
    processors: list = field(default_factory=list)
    end_ids: tuple[int, ...] = ()
    # streaming cursors: what previous snapshots already carried
    sent_tokens: int = 0
    sent_text: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def snapshot(self, final_text: bool) -> CompletionOutput:
        """A CompletionOutput with the text/tokens added since the previous snapshot."""
        out_ids = self.output_token_ids
        text = self.detok.visible_text(final_text or self.is_finished) if self.detok is not None else ""
        delta_ids = out_ids[self.sent_tokens:]
        delta_text = text[self.sent_text:]
        self.sent_tokens = len(out_ids)
        self.sent_text = len(text)
        return CompletionOutput(
            index=self.index, text=text, token_ids=list(out_ids), cumulative_logprob=self.cumulative_logprob,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            delta_text=delta_text, delta_token_ids=list(delta_ids),
            constraint_satisfied=self.constraint_satisfied if self.is_finished else None,
        )

    @property
    def constraint_satisfied(self) -> bool | None:
        """All constraining processors complete (None: none constrains this sequence)."""
        flags = [p.satisfied for p in self.processors if getattr(p, "satisfied", None) is not None]
        return all(flags) if flags else None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """A snapshot of all completions (deltas since the previous call)."""
        done = self.finished
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=[s.snapshot(done) for s in self.seqs], finished=done, metrics=self.metrics,
        )
