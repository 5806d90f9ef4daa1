"""The offline entry point: ``lmstack.load(path)`` -> :class:`LLM` with ``generate`` / ``stream`` / ``chat``.

    import lmstack
    llm = lmstack.load("runs/sft/final")
    out = llm.generate(["Hello", "Bonjour"], temperature=0, max_tokens=32)
    print(out[0].outputs[0].text)
    for delta in llm.stream("Once upon a time", max_tokens=64):
        print(delta, end="", flush=True)

Every call runs on one :class:`~lmstack.serve.engine.LLMEngine` (paged KV cache, continuous batching);
the HTTP server wraps the same object in :class:`~lmstack.serve.async_engine.AsyncEngine`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import ConfigError
from lmstack.model.transformer import Transformer
from lmstack.serve.engine import LLMEngine
from lmstack.serve.types import RequestOutput, SamplingParams
from lmstack.utils.progress import progress

Prompt = str | list[int]


def _params(sampling: SamplingParams | None, kw: dict[str, Any]) -> SamplingParams:
    """SamplingParams from an object and/or keyword overrides (validated; the caller's object is not changed)."""
    if "max_new_tokens" in kw:
        kw = {**kw, "max_tokens": kw["max_new_tokens"]}
        del kw["max_new_tokens"]
    base = dict(sampling.__dict__) if sampling is not None else {}
    return SamplingParams.from_kwargs(**{**base, **kw})


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    """(list of prompts, whether a single prompt was given)."""
    if isinstance(prompts, str):
        return [prompts], True
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts], True  # one prompt as token ids
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list, tuple)):
            raise ConfigError(f"prompts[{i}] is a {type(p).__name__}; expected a string or a list of token ids")
    return [p if isinstance(p, str) else list(p) for p in prompts], False


class LLM:
    """A model, its tokenizer and the engine that generates with them."""

    def __init__(self, model: Transformer, tokenizer: Any | None = None, *, model_name: str = "model",
                 adapter: Any | None = None, **engine_kw: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapter = adapter  # lmstack.tune.adapters.AdapterRuntime or None
        prefix_kv = getattr(adapter, "prefix_kv", None)
        draft = engine_kw.pop("speculative_model", None)
        if draft is not None:  # speculative decoding (lmstack.serve.speculative): a draft Transformer
            from lmstack.serve.speculative import SpeculativeEngine

            engine_kw["num_speculative_tokens"] = engine_kw.get("num_speculative_tokens") or 4
            self.engine = SpeculativeEngine(model, tokenizer, draft_model=draft, prefix_kv=prefix_kv, **engine_kw)
        else:
            engine_kw.pop("num_speculative_tokens", None)
            self.engine = LLMEngine(model, tokenizer, prefix_kv=prefix_kv, **engine_kw)

    def close(self) -> None:
        """Release what outlives the object: the tensor-parallel worker processes (a no-op without them)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool | None = None, **sampling_kw: Any) -> list[RequestOutput]:
        """Complete every prompt; returns one finished RequestOutput per prompt, in order.

        ``sampling`` is one SamplingParams for all prompts or a list with one per prompt (e.g. a Python-syntax
        constraint that continues each prompt's own code); ``sampling_kw`` are SamplingParams fields applied to
        each (``max_new_tokens`` is accepted for ``max_tokens``)."""
        plist, _ = _as_prompt_list(prompts)
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(plist):
                raise ConfigError(f"{len(sampling)} SamplingParams for {len(plist)} prompts; give one, or one each")
            plist_params = [_params(s, sampling_kw) for s in sampling]
        else:
            plist_params = [_params(sampling, sampling_kw)] * len(plist)  # type: ignore[arg-type]
        eng = self.engine
        ids = []
        try:
            for p, params in zip(plist, plist_params):
                ids.append(eng.add_request(p, params).request_id)
            results: dict[str, RequestOutput] = {}
            show = use_tqdm if use_tqdm is not None else len(plist) > 1
            with progress(transient=True, disable=None if show else True) as bar:
                task = bar.add_task("generating", total=len(plist))
                while len(results) < len(ids):
                    for out in eng.step():
                        if out.finished and out.request_id in ids:
                            results[out.request_id] = out
                            bar.advance(task)
        finally:
            for rid in ids:  # on an exception (Ctrl-C), free what is still running
                if rid in eng.requests:
                    eng.abort_request(rid)
        return [results[r] for r in ids]

    def stream(self, prompt: Prompt, sampling: SamplingParams | None = None, **sampling_kw: Any) -> Iterator[str]:
        """Yield text deltas of one completion as they are decoded (stop strings never appear)."""
        for out in self.stream_outputs(prompt, sampling, **sampling_kw):
            if out.outputs[0].delta_text:
                yield out.outputs[0].delta_text

    def stream_outputs(self, prompt: Prompt, sampling: SamplingParams | None = None,
                       **sampling_kw: Any) -> Iterator[RequestOutput]:
        """Yield RequestOutput snapshots (with deltas) for one prompt; the last has ``finished=True``."""
        params = _params(sampling, sampling_kw)
        eng = self.engine
        rid = eng.add_request(prompt, params).request_id
        try:
            while True:
                for out in eng.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            if rid in eng.requests:  # the consumer stopped early: free the blocks now
                eng.abort_request(rid)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("chat needs a tokenizer with a chat template; this model directory has no tokenizer")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def chat(self, messages: list[dict[str, Any]], sampling: SamplingParams | None = None,
             **sampling_kw: Any) -> RequestOutput:
        """One assistant reply to ``messages`` ([{"role": ..., "content": ...}]) via the chat template."""
        return self.generate([self.chat_prompt(messages)], sampling, use_tqdm=False, **sampling_kw)[0]


def load_weights(path: str | Path, adapter: str | Path | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, merge_lora: bool = True) -> tuple[Transformer, Any]:
    """The model of a directory with its adapter applied (a LoRA merged unless ``merge_lora=False``):
    (model, adapter runtime or None). Every tensor-parallel rank loads through this."""
    from lmstack.quant.checkpoint import load_any

    model = load_any(path, device=device, dtype=dtype)  # float or lmstack-quantized (int8 / int4) weights
    runtime = None
    if adapter is not None:
        from lmstack.tune.adapters import load_adapter

        runtime = load_adapter(model, adapter)
        if runtime.method == "lora" and merge_lora:
            from lmstack.tune.lora import merge_lora as merge

            merge(model)
    return model, runtime


def load(path: str | Path, adapter: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, max_num_seqs: int = 64, max_model_len: int | None = None,
         kv_cache_memory: int | None = None, block_size: int = 16, merge_lora: bool = True,
         tensor_parallel: int = 1, **engine_kw: Any) -> LLM:
    """Load a model directory (HF layout, with its tokenizer when present) and an optional adapter
    (LoRA / prompt / prefix tuning, PEFT layout) into a ready-to-generate :class:`LLM`.

    A LoRA adapter is merged into the base weights (``W + B A * scaling``; the engine serves one adapter, and
    plain linears take the fused and compiled decode paths); ``merge_lora=False`` keeps the adapter modules.
    ``speculative_model=DIR`` (with ``num_speculative_tokens``, default 4): a draft model sharing the tokenizer
    for speculative decoding (:mod:`lmstack.serve.speculative`).
    ``tensor_parallel=N``: split the model over N processes (this one is rank 0; :mod:`lmstack.serve.tp`);
    call :meth:`LLM.close` (or leave the interpreter) to stop them."""
    from lmstack.export.gguf_import import resolve_model_path

    path = resolve_model_path(path)  # a .gguf file is imported once into a cache directory
    if tensor_parallel > 1 and (engine_kw.get("speculative_model") is not None or not merge_lora):
        raise ConfigError("tensor parallelism (--tp > 1) serves one model without a draft model and with LoRA "
                          "merged; drop --speculative-model / merge_lora=False or use --tp 1")
    model, runtime = load_weights(path, adapter, device, dtype, merge_lora)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from lmstack.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    if tensor_parallel > 1:
        if runtime is not None and runtime.method != "lora":
            raise ConfigError(f"a {runtime.method} adapter's prefix key/values are not split over ranks; "
                              "serve it with --tp 1")
        from lmstack.serve.tp import start

        engine_kw["tp"] = start(model, {"path": str(path), "adapter": None if adapter is None else str(adapter),
                                        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
                                        "merge_lora": merge_lora}, tensor_parallel)
    elif tensor_parallel < 1:
        raise ConfigError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    if isinstance(engine_kw.get("speculative_model"), (str, os.PathLike)):
        from lmstack.serve.speculative import load_draft

        engine_kw["speculative_model"] = load_draft(engine_kw["speculative_model"], device=model.device,
                                                    dtype=dtype)
    try:
        return LLM(model, tokenizer, model_name=path.resolve().name, adapter=runtime, max_num_seqs=max_num_seqs,
                   max_model_len=max_model_len, kv_cache_memory=kv_cache_memory, block_size=block_size, **engine_kw)
    except BaseException:
        if engine_kw.get("tp") is not None:  # a bad engine setting: stop the workers now
            engine_kw["tp"].close()
        raise
