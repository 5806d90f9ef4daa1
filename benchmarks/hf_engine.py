"""A reference engine: ``transformers`` ``generate``, one request at a time, behind the AsyncEngine interface.

This is the baseline of ``benchmarks/serve.py`` (what a naive server does: no batching, no paged KV
cache, no prefix cache) and a second implementation the HTTP layer can be checked against
(``tests/test_serve_api.py`` serves it with :func:`lmstack.serve.api.create_app`). It lives beside the
benchmark, not in the package: nothing in lmstack imports it. It speaks the
same seam as :class:`lmstack.serve.async_engine.AsyncEngine`: ``generate(prompt, params, request_id)``
yields :class:`RequestOutput` snapshots with ``delta_text`` / ``delta_token_ids``; ``abort``; ``stats``;
``shutdown``. Not supported here: logprobs, min_p, presence/frequency penalties (the API still accepts
them; this engine ignores them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import torch

from lmstack.serve.errors import EngineShuttingDown, PromptTooLong, QueueFull
from lmstack.serve.types import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams


class HFEngine:
    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_model_len: int | None = None, max_waiting: int = 256):
        import transformers

        from lmstack.tokenizer import Tokenizer

        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.model_name = Path(model_dir).name
        self.max_model_len = max_model_len or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.device, self.max_waiting = device, max_waiting
        self._lock = asyncio.Lock()
        self._aborted: set[str] = set()
        self._waiting = 0
        self._running = 0
        self._closing = False
        self._prompt_tokens = 0
        self._gen_tokens = 0

    def stats(self) -> dict:
        return dict(num_running=self._running, num_waiting=self._waiting, kv_blocks_used=0, kv_blocks_total=0,
                    kv_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0,
                    prompt_tokens_total=self._prompt_tokens, generation_tokens_total=self._gen_tokens,
                    preemptions_total=0)

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def shutdown(self, drain: bool = True) -> None:
        self._closing = True
        if drain:
            async with self._lock:
                pass

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self._closing:
            raise EngineShuttingDown()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(self.max_model_len, len(ids))
        if self._waiting >= self.max_waiting:
            raise QueueFull(self.max_waiting)
        metrics = RequestMetrics(arrival_time=time.time())
        outs = [CompletionOutput(index=i) for i in range(params.n)]
        # An admission snapshot (no tokens yet): the caller learns the request was accepted.
        yield RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids, outs, False, metrics)
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        self._running = 1
        try:
            metrics.first_scheduled_time = time.time()
            self._prompt_tokens += len(ids)
            for out in outs:
                async for snap in self._one(ids, params, request_id, out, outs, metrics):
                    yield snap
                if request_id in self._aborted:
                    break
            metrics.finished_time = time.time()
            for o in outs:
                o.finish_reason = o.finish_reason or "abort"
                o.delta_text, o.delta_token_ids = "", []
            yield RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids, outs, True, metrics)
        finally:
            self._running = 0
            self._aborted.discard(request_id)
            self._lock.release()

    async def _one(self, ids: list[int], p: SamplingParams, rid: str, out: CompletionOutput,
                   outs: list[CompletionOutput], metrics: RequestMetrics) -> AsyncIterator[RequestOutput]:
        """Run ``model.generate`` in a thread; its streamer hands token ids to this coroutine."""
        import transformers

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_now = threading.Event()
        eos = list(self.tokenizer.eos_token_ids)

        class Streamer(transformers.generation.streamers.BaseStreamer):
            first = True

            def put(self, value: torch.Tensor) -> None:
                if self.first:  # the first put() is the prompt
                    self.first = False
                    return
                for t in value.reshape(-1).tolist():
                    loop.call_soon_threadsafe(queue.put_nowait, int(t))

            def end(self) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        class Stop(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), stop_now.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        gen = dict(max_new_tokens=p.max_tokens, do_sample=p.temperature > 0, streamer=Streamer(),
                   stopping_criteria=transformers.StoppingCriteriaList([Stop()]), pad_token_id=eos[0] if eos else 0,
                   eos_token_id=None if p.ignore_eos else (eos or None),
                   repetition_penalty=p.repetition_penalty)
        if p.temperature > 0:
            gen.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
        seed = p.seed if p.seed is not None else None

        def run() -> None:
            try:
                if seed is not None:
                    torch.manual_seed(seed + out.index)
                with torch.inference_mode():
                    self.model.generate(torch.tensor([ids], device=self.device),
                                        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                                        **gen)
            except BaseException:
                loop.call_soon_threadsafe(queue.put_nowait, None)
                raise

        thread = loop.run_in_executor(None, run)
        text_len = 0
        try:
            while True:
                tok = await queue.get()
                if tok is None:
                    break
                if rid in self._aborted:
                    stop_now.set()
                    out.finish_reason = "abort"
                    continue
                if out.finish_reason is not None:
                    continue
                if metrics.first_token_time is None:
                    metrics.first_token_time = time.time()
                self._gen_tokens += 1
                out.token_ids.append(tok)
                text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                hit = next((s for s in p.stop if s in text), None)
                if hit is not None:
                    text = text[: text.index(hit)]
                    out.finish_reason, out.stop_reason = "stop", hit
                    stop_now.set()
                elif tok in eos and not p.ignore_eos:
                    out.finish_reason, out.stop_reason = "stop", tok
                elif len(out.token_ids) >= p.max_tokens:
                    out.finish_reason = "length"
                if text.endswith("\ufffd") and out.finish_reason is None:
                    continue  # an incomplete UTF-8 character: wait for the next token
                out.delta_text, out.delta_token_ids = text[text_len:], [tok]
                out.text, text_len = text, len(text)
                for o in outs:
                    if o is not out:
                        o.delta_text, o.delta_token_ids = "", []
                yield RequestOutput(rid, None, ids, outs, False, metrics)
        finally:
            stop_now.set()
            await thread
