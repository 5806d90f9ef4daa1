"""Serving: the generation engine (paged KV cache, continuous batching) and the offline API.

``lmstack.serve.llm.load(path)`` -> :class:`~lmstack.serve.llm.LLM`; the HTTP API (``serve/api``) and web
chat (``serve/ui``) sit on :class:`~lmstack.serve.async_engine.AsyncEngine`. See docs/generation.md.
Importing this package stays light; the engine modules import torch.
"""

from lmstack.serve.types import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams, TokenLogprob

__all__ = ["CompletionOutput", "RequestMetrics", "RequestOutput", "SamplingParams", "TokenLogprob"]
