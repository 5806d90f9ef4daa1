"""LLMEngine: the one generation loop behind ``lmstack.load(...).generate``, the CLI and the HTTP server.

``step()``: ``scheduler.schedule()`` picks prefill and decode work under a token budget ->
``runner.run(batch)`` does one forward pass over the paged KV cache -> ``sampler`` picks a token per
sequence (its own params and seed) -> ``scheduler.update()`` appends tokens, finishes on
stop / length / abort and frees blocks. Returns a :class:`RequestOutput` snapshot (with deltas) for each
request that advanced. A sequence whose logits come out NaN / inf is finished alone with ``finish_reason``
"error" (its K/V blocks scrubbed when they hold non-finite values); the rest of the batch goes on. Not thread-safe: :class:`~lmstack.serve.async_engine.AsyncEngine` serialises access.
Reference: vLLM ``LLMEngine`` / ``EngineCore.step``, nano-vllm ``llm_engine.py``.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch

from lmstack.errors import ConfigError
from lmstack.model.transformer import Transformer
from lmstack.serve.block_manager import BlockManager
from lmstack.serve.detokenizer import IncrementalDetokenizer
from lmstack.serve.errors import PromptTooLong
from lmstack.kernels import load_cpu_decode, mode as kernel_mode
from lmstack.serve.runner import ModelRunner, kernel_supported
from lmstack.serve.sampler import NON_FINITE, Sampler
from lmstack.serve.scheduler import Scheduler
from lmstack.serve.sequence import Request, Sequence
from lmstack.serve.logits import LogitBias, LogitsProcessorFactory
from lmstack.serve.types import RequestOutput, SamplingParams, StructuredOutput

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30  # 1 GiB
GPU_KV_FRACTION = 0.5  # of the memory free after loading the weights


def default_kv_cache_memory(model: Transformer, max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Enough for every sequence at full length, capped at 1 GiB on CPU / half the free GPU memory."""
    need = max_num_seqs * (-(-max_model_len // block_size) + 1) * ModelRunner.kv_bytes_per_block(model, block_size)
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return min(need, int(free * GPU_KV_FRACTION))
    return min(need, CPU_DEFAULT_KV_BYTES)


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Any | None = None,
        *,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        eos_token_ids: list[int] | None = None,
        use_kernel: bool | None = None,
        kernel_max_batch: int = 8,
        tp: Any = None,
    ):
        cfg = model.config
        self.tp = tp  # lmstack.serve.tp.TPGroup: this is rank 0 of a tensor-parallel engine (model already sharded)
        if block_size < 1 or max_num_seqs < 1:
            raise ConfigError("block_size and max_num_seqs must be >= 1")
        self.model = model.eval()
        # decode-only steps at small batch run through the compiled CPU kernel when it can run this model
        # (lmstack.kernels; LMSTACK_KERNELS=0 turns it off, use_kernel=False here too)
        self.kernel_reason = ("disabled" if use_kernel is False else "LMSTACK_KERNELS=0" if kernel_mode() == "off"
                              else kernel_supported(model, prefix_kv))
        if self.kernel_reason is None and not load_cpu_decode():
            self.kernel_reason = "the kernel could not be built (see the warning above)"
        use = self.kernel_reason is None
        # eager path: q/k/v and gate/up as one matmul each, column-major for the CPU matmuls (the parameters become
        # views of the fused weights). The kernel reads the weights as loaded (no fused copy beside memory-mapped
        # ones; lmstack.serve.runner.KernelDecode)
        if not use:
            model.fuse_projections(column_major=True)
        self.tokenizer = tokenizer
        num_prefix = prefix_kv[0][0].shape[1] if prefix_kv else 0
        self.num_prefix = num_prefix
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings - num_prefix)
        if self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        self.block_size = block_size
        kv_bytes = kv_cache_memory if kv_cache_memory is not None else default_kv_cache_memory(
            model, max_num_seqs, self.max_model_len, block_size)
        per_block = ModelRunner.kv_bytes_per_block(model, block_size)
        num_blocks = int(kv_bytes) // per_block
        if num_blocks < 1:
            raise ConfigError(f"kv_cache_memory={kv_bytes} bytes holds no KV block ({per_block} bytes per block "
                              f"of {block_size} tokens); raise kv_cache_memory")
        self.max_num_batched_tokens = int(max_num_batched_tokens or max(2048, max_num_seqs))
        if eos_token_ids is None:
            eos_token_ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
            e = cfg.eos_token_id
            eos_token_ids += [e] if isinstance(e, int) else list(e or [])
        self.eos_token_ids = set(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens,
                                   self.max_model_len, self.eos_token_ids)
        self.runner = ModelRunner(model, num_blocks, block_size, prefix_kv, use_kernel=use,
                                  kernel_max_batch=kernel_max_batch)
        if tp is not None:  # the workers build the same pool and then follow every step (lmstack.serve.tp)
            from lmstack.serve.tp import TPRunner

            self.runner = TPRunner(self.runner, tp, fused=not use)
        self.sampler = Sampler(self.eos_token_ids, model.device)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ------------------------------------------------------------------ the logits step
    def grammar_backend(self):
        """The llguidance backend for this engine's tokenizer (built on first use)."""
        from lmstack.serve.structured import StructuredError, backend_for

        if self.tokenizer is None:
            raise StructuredError("structured output needs a tokenizer; this model directory has none")
        return backend_for(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)

    def structured_factory(self, so: StructuredOutput) -> LogitsProcessorFactory:
        """Compile a constraint (cached) into a per-sequence processor factory; StructuredError if it cannot."""
        if so.kind == "python":
            from lmstack.serve.python_syntax import PythonSyntax

            tok = self.tokenizer
            return lambda: PythonSyntax(tok, self.eos_token_ids, prefix=so.spec)
        return self.grammar_backend().factory(so)

    def processor_factories(self, params: SamplingParams) -> list[LogitsProcessorFactory]:
        """The request's logits step, in order: logit_bias, its structured constraint, the copy bonus (grounded
        decoding), its own processors."""
        out: list[LogitsProcessorFactory] = []
        if params.logit_bias:
            V = self.model.config.vocab_size
            bad = [t for t in params.logit_bias if not 0 <= t < V]
            if bad:
                raise ConfigError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {V})")
            bias = LogitBias(params.logit_bias)
            out.append(lambda: bias)  # stateless: one shared by every sequence
        if params.structured is not None:
            out.append(self.structured_factory(params.structured))
        if params.copy is not None and params.copy.texts and (params.copy.bias or params.copy.start_bias
                                                              or any(params.copy.weights or ())):
            if self.tokenizer is None:
                raise ConfigError("copy (grounded decoding) needs the engine's tokenizer")
            from lmstack.serve.logits import CopyBias

            c = params.copy
            kept = [i for i, t in enumerate(c.texts) if t.strip()]
            table = CopyBias([self.tokenizer.encode(c.texts[i]) for i in kept], bias=c.bias, start_bias=c.start_bias,
                             weights=None if c.weights is None else [c.weights[i] for i in kept])
            out.append(table.fresh)  # one n-gram table per request; each of its n sequences its own output
        out.extend(params.logits_processors)
        return out

    # ------------------------------------------------------------------ scoring beside the engine
    def _check_scoring(self, what: str) -> None:
        if self.tp is not None:
            raise ConfigError(f"{what} is not available under tensor parallelism (--tp); serve with --tp 1")
        if self.num_prefix:
            raise ConfigError(f"{what} is not available for a model served with a prompt/prefix-tuning adapter")

    def score_prompt(self, ids: list[int], k: int = 0) -> list:
        """Log-probs of each prompt token given the ones before it (``lmstack.serve.scoring``; thread-safe beside
        ``step``: it only reads the weights)."""
        from lmstack.serve.scoring import prompt_logprobs

        self._check_scoring("prompt log-probs")
        return prompt_logprobs(self.model, ids, k)

    def embed(self, ids: list[int]) -> list[float]:
        """Mean-pooled final hidden state of ``ids`` (``lmstack.serve.scoring``)."""
        from lmstack.serve.scoring import mean_embedding

        self._check_scoring("embeddings")
        return mean_embedding(self.model, ids)

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this model directory has no tokenizer; pass prompts as token id lists")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = [int(t) for t in prompt]
        V = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        return None, ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Request:
        params = params or SamplingParams()
        params.validate()
        if request_id is None:
            request_id = f"req-{next(self._req_ids)}"
        if request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        text, ids = self.encode_prompt(prompt)
        if not ids:
            raise ConfigError("the prompt is empty (0 tokens)")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(self.max_model_len - 1, len(ids), "the context (max_model_len - 1)")
        capacity = self.block_manager.num_blocks * self.block_size
        if len(ids) >= capacity:
            raise PromptTooLong(capacity - 1, len(ids), "the KV cache")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; this model directory has none (use stop_token_ids)")
        factories = self.processor_factories(params)
        end_ids = tuple(sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)))
        req = Request(request_id, text, ids, params)
        for j in range(params.n):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output,
                                               params.skip_special_tokens)
            seq = Sequence(next(self._seq_ids), req, j, list(ids), len(ids),
                           Sampler.make_generator(params, j, self.model.device), detok)
            if params.logprobs is not None:
                seq.logprobs = []
            seq.processors = [f() for f in factories]
            seq.end_ids = end_ids
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.prompt_tokens_total += len(ids)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request now (reason "abort") and free its KV blocks. Returns its last snapshot."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
        req.metrics.finished_time = time.time()
        return req.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ step
    def _fail(self, seq: Sequence) -> None:
        """Finish a sequence whose logits were not finite (reason "error"). Its K/V may hold NaN / inf: a block
        that does leaves the prefix cache and, when no other sequence holds it, is zeroed before it is freed
        (a stale NaN in a slot that attention masks still poisons it: 0 * NaN)."""
        r = self.runner
        blocks = list(seq.block_table)
        if blocks:
            idx = torch.tensor(blocks, dtype=torch.long, device=r.device)
            dirty = torch.zeros(len(blocks), dtype=torch.bool, device=r.device)
            for k, v in zip(r.k_pool, r.v_pool):
                dirty |= ~torch.isfinite(k[idx]).flatten(1).all(-1) | ~torch.isfinite(v[idx]).flatten(1).all(-1)
            bad = [b for b, d in zip(blocks, dirty.tolist()) if d]
            if self.tp is not None:  # the other ranks' heads are not visible here: treat every block as dirty
                bad = blocks
            if bad:
                self.block_manager.uncache(bad)
                own = [b for b in bad if self.block_manager.ref_count[b] == 1]
                if own:
                    r.zero_blocks(own)  # under TP: on every rank
        self.scheduler.finish(seq, "error")
        log.warning("request %s: the model gave non-finite logits after %d generated tokens; finished with "
                    "finish_reason 'error'", seq.request.request_id, seq.num_output_tokens)

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        sampled: dict[int, int] = {}
        failed: list[Sequence] = []
        if out.scheduled:
            logits, rows = self.runner.run([s for s in out.scheduled])
            seqs = [s.seq for s, r in zip(out.scheduled, rows) if r >= 0]
            if seqs:
                chosen, lps = self.sampler(logits, seqs)
                now = time.time()
                for seq, tok, lp in zip(seqs, chosen, lps):
                    if tok == NON_FINITE:
                        if not seq.request.aborted:
                            failed.append(seq)
                        continue
                    sampled[seq.seq_id] = tok
                    if lp is not None:
                        seq.logprobs.append(lp)
                        seq.cumulative_logprob += lp.logprob
                    if seq.request.metrics.first_token_time is None:
                        seq.request.metrics.first_token_time = now
                self.generation_tokens_total += len(seqs) - len(failed)
        for seq in failed:  # before update(), which then leaves them alone
            self._fail(seq)
        finished = self.scheduler.update(out, sampled) + failed
        for s in out.scheduled:  # processors advance (and start their next mask while the next step runs)
            seq = s.seq
            if seq.processors and seq.seq_id in sampled and not seq.request.aborted:
                for p in seq.processors:
                    p.accept(sampled[seq.seq_id])
        touched: dict[str, Request] = {}
        for s in out.scheduled:
            if s.seq.seq_id in sampled:
                touched[s.seq.request.request_id] = s.seq.request
        for seq in finished:
            touched[seq.request.request_id] = seq.request
        return self._outputs(touched)

    def _outputs(self, touched: dict[str, Request]) -> list[RequestOutput]:
        """The outputs of the requests a step touched; finished ones leave the engine (timestamped)."""
        outputs = []
        for rid, req in touched.items():
            if req.finished:
                req.metrics.finished_time = time.time()
                self.requests.pop(rid, None)
            outputs.append(req.output())
        return outputs

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent)."""
        if self.tp is not None:
            self.tp.close()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, float | int]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": bm.num_used,
            "kv_blocks_total": bm.num_blocks,
            "kv_usage": bm.num_used / bm.num_blocks,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "preemptions_total": self.scheduler.num_preemptions,
        }
