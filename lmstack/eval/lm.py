"""The model side of evaluation: log-likelihood of continuations, rolling perplexity windows, generation.

Semantics follow lm-evaluation-harness (Gao et al., ``lm_eval/models/huggingface.py``) so scores agree:
a (context, continuation) pair is tokenized as ``whole = enc(context + continuation)``,
``cont = whole[len(enc(context)):]`` (trailing spaces of the context move to the continuation); the model
reads ``(ctx + cont)[:-1]`` truncated on the left to ``max_length`` and the continuation's log-probability is
the sum over its tokens. Rolling perplexity uses the strided sliding window of the ``transformers``
"Perplexity of fixed-length models" guide: every token is scored once, with up to ``max_length - stride``
tokens of extra context.

Scoring is batched by a token budget, rows with identical inputs are computed once (MMLU's four one-token
letters share one forward pass), and the LM head runs only on the positions that are scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lmstack.errors import ConfigError


class EvalLM:
    """A loaded model + tokenizer with the three operations evaluation needs."""

    def __init__(self, model, tokenizer, *, model_dir: str | None = None, adapter: str | None = None,
                 adapter_runtime=None, batch_tokens: int = 8192, max_batch: int = 64, max_length: int | None = None,
                 engine: Callable | None = None, share_prefix: bool = True):
        self.model = model.eval()
        self.tok = tokenizer  # lmstack.tokenizer.Tokenizer: the one tokenizer class (chat templates, sanitizing)
        cfg = model.config
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id
        eos = [] if cfg.eos_token_id is None else (
            list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id])
        self.eos_ids = [int(i) for i in dict.fromkeys(tokenizer.eos_token_ids + eos)]  # + e.g. <|im_end|>
        self.model_dir = model_dir
        self.adapter = adapter
        self.adapter_runtime = adapter_runtime  # lmstack.tune.adapters.AdapterRuntime or None
        self.prefix_kv = getattr(adapter_runtime, "prefix_kv", None)  # prompt / prefix tuning: per-layer (k, v)
        # generation runs on the serving engine: a callable (lm, prompts, **sampling) -> completions that the
        # caller above lmstack.serve passes in (lmstack.serve.evaluation.generate), so there is one decoding loop
        self.engine = engine
        self.share_prefix = share_prefix  # score options of one context on its cached keys (shared_prefix.py)
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        n_virtual = self.prefix_kv[0][0].shape[-2] if self.prefix_kv is not None else 0  # adapter's P slots
        self.max_length = max_length or model.config.max_position_embeddings - n_virtual
        self.device = model.device

    @classmethod
    def load(cls, model_dir: str | Path, adapter: str | Path | None = None, device: str | None = None,
             dtype: str | None = None, **kw) -> "EvalLM":
        from lmstack.export.gguf_import import resolve_model_path
        from lmstack.quant.checkpoint import load_any
        from lmstack.tokenizer import Tokenizer

        model_dir = resolve_model_path(model_dir)  # a .gguf file: imported once into a cache directory
        model = load_any(model_dir, device=device, dtype=dtype)  # float or lmstack-quantized weights
        runtime = None
        if adapter is not None:
            try:
                from lmstack.tune.adapters import load_adapter
            except ImportError as e:
                raise ConfigError(f"--adapter needs lmstack.tune.adapters, which is not available ({e})") from None
            runtime = load_adapter(model, adapter)  # LoRA: swaps linears in place; prompt/prefix: prefix_kv
            model.eval()
        return cls(model, Tokenizer.from_dir(model_dir), model_dir=str(model_dir),
                   adapter=str(adapter) if adapter else None, adapter_runtime=runtime, **kw)

    # ------------------------------------------------------------------ tokenization
    def prefix_ids(self) -> list[int]:
        """What an empty context becomes: BOS, else the first EOS (lm-eval's ``prefix_token_id``)."""
        if self.bos_id is not None:
            return [self.bos_id]
        if self.eos_ids:
            return [self.eos_ids[0]]
        raise ConfigError("the tokenizer has neither BOS nor EOS; an empty context cannot be scored")

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return self.prefix_ids(), self.tok.encode(continuation)
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress_cb=None) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation, per pair."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], progress_cb)

    @torch.no_grad()
    def loglikelihood_tokens(self, reqs: Sequence[tuple[list[int], list[int]]],
                             progress_cb=None) -> list[tuple[float, bool]]:
        """(sum log p(cont | ctx), greedy?) per (ctx ids, cont ids); ``progress_cb(k)`` after k requests.

        Requests that share a context with others run through :mod:`lmstack.eval.shared_prefix` (the
        context once, the continuations batched on its cached keys); the rest are batched whole, rows with
        identical inputs computed once."""
        trimmed: list[tuple[tuple[int, ...], list[int]]] = []  # distinct (context after left truncation, cont)
        where: list[int] = []  # request -> index into trimmed (identical requests are scored once)
        seen: dict[tuple, int] = {}
        for ctx, cont in reqs:
            if not cont:
                raise ValueError("empty continuation")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            cont = list(cont[-(len(full) - 1):]) if len(cont) >= len(full) else list(cont)  # >= 1 context token
            item = (tuple(full[:len(full) - len(cont)]), cont)
            key = (item[0], tuple(cont))
            if key not in seen:
                seen[key] = len(trimmed)
                trimmed.append(item)
            where.append(seen[key])
        if progress_cb is not None and len(trimmed) < len(reqs):
            progress_cb(len(reqs) - len(trimmed))  # duplicates are answered by their first occurrence
        scores = self._score_distinct(trimmed, progress_cb)
        return [scores[w] for w in where]

    def _score_distinct(self, trimmed: list[tuple[tuple[int, ...], list[int]]], progress_cb=None):
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (c, _) in enumerate(trimmed):
            by_ctx.setdefault(c, []).append(i)
        shared_ok = self.prefix_kv is None and self.model.config.sliding_window is None and self.share_prefix
        shared = [idx for idx in by_ctx.values()
                  if shared_ok and len(idx) > 1 and any(len(trimmed[i][1]) > 1 for i in idx)]
        out: list[tuple[float, bool] | None] = [None] * len(trimmed)
        if shared:
            from lmstack.eval.shared_prefix import score_groups

            groups = [(list(trimmed[idx[0]][0]), [trimmed[i][1] for i in idx]) for idx in shared]
            for idx, scores in zip(shared, score_groups(self.model, groups, self.batch_tokens, progress_cb)):
                for i, sc in zip(idx, scores):
                    out[i] = sc
        rest = [i for i in range(len(trimmed)) if out[i] is None]
        for i, sc in zip(rest, self._score_whole([trimmed[i] for i in rest], progress_cb)):
            out[i] = sc
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _score_whole(self, reqs: list[tuple[tuple[int, ...], list[int]]], progress_cb=None):
        rows: dict[tuple[int, ...], int] = {}  # distinct model input -> row index
        inputs: list[tuple[int, ...]] = []
        plan: list[tuple[int, list[int]]] = []  # per request: (row, continuation ids)
        for ctx, cont in reqs:
            key = tuple(ctx) + tuple(cont[:-1])
            if key not in rows:
                rows[key] = len(inputs)
                inputs.append(key)
            plan.append((rows[key], cont))
        need: list[int] = [0] * len(inputs)  # positions each row must score (union over its requests)
        users: list[int] = [0] * len(inputs)  # requests answered by each row (progress)
        for r, cont in plan:
            need[r] = max(need[r], len(cont))
            users[r] += 1
        logprobs: list[torch.Tensor | None] = [None] * len(inputs)  # (need, V) log-softmax per row
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        i = 0
        while i < len(order):
            T = len(inputs[order[i]])
            bs = max(1, min(self.max_batch, self.batch_tokens // max(T, 1)))
            batch = order[i:i + bs]
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            for b, r in enumerate(batch):
                ids[b, :len(inputs[r])] = torch.tensor(inputs[r])
            h = self._hidden(ids.to(self.device))  # (B, T, hidden); right padding is never seen
            for b, r in enumerate(batch):
                L = len(inputs[r])
                logits = self.model.lm_head(h[b, L - need[r]:L]).float()  # (need, V)
                logprobs[r] = torch.log_softmax(logits, dim=-1).cpu()
            i += len(batch)
            if progress_cb is not None:
                progress_cb(sum(users[r] for r in batch))
        out = []
        for r, cont in plan:
            lp = logprobs[r][-len(cont):]  # (len(cont), V)
            tgt = torch.tensor(cont)
            score = lp.gather(1, tgt[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == tgt).all())
            out.append((score, greedy))
        return out

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, hidden); with a prompt/prefix adapter, tokens sit after its P slots."""
        if self.prefix_kv is None:
            return self.model.hidden_states(ids)
        from lmstack.tune.prompt import PrefixContext

        P = self.prefix_kv[0][0].shape[-2]
        B, T = ids.shape
        pos = torch.arange(P, P + T, device=ids.device).expand(B, T)
        return self.model.hidden_states(ids, position_ids=pos,
                                        ctx=PrefixContext(self.prefix_kv, sliding_window=self.model.config.attention_window))

    def rolling_windows(self, ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
        """Split a token sequence into (context, targets) windows scoring every token after the first once.

        Window w covers ids[begin:end] with end = begin + max_length; it scores the tokens not scored by the
        previous window, so later windows see ``max_length - stride`` tokens of context."""
        max_length = min(max_length, self.max_length)
        out, prev_end, n = [], 0, len(ids)
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            start = max(prev_end, begin + 1)
            if start < end:
                out.append((ids[begin:start], ids[start:end]))
            prev_end = end
            if end == n:
                break
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], *, max_tokens: int = 64, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, n: int = 1, seed: int = 0,
                 progress_cb=None, python_syntax: bool = False, copy: Sequence[Any] | None = None) -> list[list[str]]:
        """``n`` completions per prompt (greedy when temperature is 0), cut at the first stop string, decoded by
        the serving engine that the caller attached (``engine=lmstack.serve.evaluation.generate``).
        ``python_syntax``: each completion is kept valid Python as a continuation of its prompt (code tasks).
        ``copy``: per prompt, None or the texts its answer may quote with the bonuses (``{"texts", "bias",
        "start_bias"}``, the engine's ``CopyFrom``): grounded decoding."""
        if self.engine is None:
            raise ConfigError("generation tasks run on the serving engine: pass engine=lmstack.serve.evaluation."
                              "generate to EvalLM / run_eval (lmstack eval and lmstack run do)")
        kw: dict[str, Any] = {"python_syntax": True} if python_syntax else {}  # engines without it still work off
        if copy is not None and any(c is not None for c in copy):
            kw["copy"] = list(copy)
        return self.engine(self, list(prompts), max_tokens=max_tokens, stop=list(stop), temperature=temperature,
                           top_p=top_p, n=n, seed=seed, progress_cb=progress_cb, **kw)
