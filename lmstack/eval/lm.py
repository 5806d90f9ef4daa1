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

import json
from pathlib import Path
from typing import Sequence

import torch

from lmstack.errors import CheckpointError, ConfigError, LmstackError
from lmstack.utils.io import file_sha256


class EvalTokenizer:
    """Reads a model directory's ``tokenizer.json`` (+ ``tokenizer_config.json`` for special tokens and the
    chat template) with the ``tokenizers`` library: the on-disk contract, no dependency on training code."""

    def __init__(self, model_dir: str | Path, model_cfg=None):
        from tokenizers import Tokenizer

        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{d}: no tokenizer.json; save the model with its tokenizer "
                                  "(lmstack.model.save_model(..., tokenizer_dir=...))")
        self.path = path
        self.tok = Tokenizer.from_file(str(path))
        cfg = {}
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.chat_template = cfg.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            self.chat_template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        if self.bos_id is None and model_cfg is not None:
            self.bos_id = model_cfg.bos_token_id
        eos: list[int] = []
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            eos.append(self.tok.token_to_id(self.eos_token))
        if model_cfg is not None and model_cfg.eos_token_id is not None:
            ids = model_cfg.eos_token_id if isinstance(model_cfg.eos_token_id, list) else [model_cfg.eos_token_id]
            eos += [i for i in ids if i not in eos]
        self._lm_tok = None  # lmstack.tokenizer.Tokenizer: chat templates and end-of-turn markers
        try:
            from lmstack.tokenizer import Tokenizer

            self._lm_tok = Tokenizer.from_dir(d)
            eos += [i for i in self._lm_tok.eos_token_ids if i not in eos]  # e.g. <|im_end|> ends a chat turn
        except (ImportError, LmstackError):
            pass
        self.eos_ids = eos
        self._sha: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha is None:
            self._sha = file_sha256(self.path)
        return self._sha

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render with lmstack's tokenizer (transformers semantics: ``{% generation %}``, ``strftime_now``...);
        a plain sandboxed Jinja2 render is the fallback when ``lmstack.tokenizer`` is unavailable."""
        if not self.chat_template:
            raise ConfigError(f"{self.path.parent}: the tokenizer has no chat_template; set chat: false in the "
                              "task or save a tokenizer with a chat template")
        try:
            from lmstack.tokenizer import Tokenizer
        except ImportError:
            return self._render_jinja(messages, add_generation_prompt)
        if self._lm_tok is None:
            self._lm_tok = Tokenizer.from_dir(self.path.parent)
        return self._lm_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def _render_jinja(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_str(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


class EvalLM:
    """A loaded model + tokenizer with the three operations evaluation needs."""

    def __init__(self, model, tokenizer: EvalTokenizer, *, model_dir: str | None = None, adapter: str | None = None,
                 adapter_runtime=None, batch_tokens: int = 8192, max_batch: int = 64, max_length: int | None = None,
                 generator: str = "auto", share_prefix: bool = True):
        self.model = model.eval()
        self.tok = tokenizer
        self.model_dir = model_dir
        self.adapter = adapter
        self.adapter_runtime = adapter_runtime  # lmstack.tune.adapters.AdapterRuntime or None
        self.prefix_kv = getattr(adapter_runtime, "prefix_kv", None)  # prompt / prefix tuning: per-layer (k, v)
        if generator not in ("auto", "engine", "builtin"):
            raise ConfigError(f"generator {generator!r} is not one of auto, engine, builtin")
        self.generator = generator
        self.share_prefix = share_prefix  # score options of one context on its cached keys (shared_prefix.py)
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        n_virtual = self.prefix_kv[0][0].shape[-2] if self.prefix_kv is not None else 0  # adapter's P slots
        self.max_length = max_length or model.config.max_position_embeddings - n_virtual
        self.device = model.device

    @classmethod
    def load(cls, model_dir: str | Path, adapter: str | Path | None = None, device: str | None = None,
             dtype: str | None = None, **kw) -> "EvalLM":
        from lmstack.model import load_model

        model = load_model(model_dir, device=device, dtype=dtype)
        runtime = None
        if adapter is not None:
            try:
                from lmstack.tune.adapters import load_adapter
            except ImportError as e:
                raise ConfigError(f"--adapter needs lmstack.tune.adapters, which is not available ({e})") from None
            runtime = load_adapter(model, adapter)  # LoRA: swaps linears in place; prompt/prefix: prefix_kv
            model.eval()
        return cls(model, EvalTokenizer(model_dir, model.config), model_dir=str(model_dir),
                   adapter=str(adapter) if adapter else None, adapter_runtime=runtime, **kw)

    # ------------------------------------------------------------------ tokenization
    def prefix_ids(self) -> list[int]:
        """What an empty context becomes: BOS, else the first EOS (lm-eval's ``prefix_token_id``)."""
        if self.tok.bos_id is not None:
            return [self.tok.bos_id]
        if self.tok.eos_ids:
            return [self.tok.eos_ids[0]]
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
                                        ctx=PrefixContext(self.prefix_kv, sliding_window=self.model.config.sliding_window))

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
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, max_tokens: int = 64, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, n: int = 1, seed: int = 0,
                 batch_size: int = 8, progress_cb=None) -> list[list[str]]:
        """``n`` completions per prompt (greedy when temperature is 0), cut at the first stop string.

        Runs on the serving engine (``lmstack.serve``: paged KV cache, continuous batching) when it is
        available (``generator="auto"|"engine"``), else on :mod:`lmstack.eval.generate`."""
        if self.generator != "builtin" and self.model_dir is not None:
            try:
                import importlib

                importlib.import_module("lmstack.serve.llm")
                importlib.import_module("lmstack.tokenizer")
            except ImportError:
                if self.generator == "engine":
                    raise
            else:
                return self._generate_engine(prompts, max_tokens=max_tokens, stop=stop, temperature=temperature,
                                             top_p=top_p, n=n, seed=seed, progress_cb=progress_cb)
        if self.prefix_kv is not None:
            raise ConfigError("generation with a prompt/prefix-tuning adapter needs the serving engine "
                              "(lmstack.serve); use generator: auto")
        from lmstack.eval.generate import generate_ids

        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        enc = [self.tok.encode(p) or self.prefix_ids() for _, p in flat]
        order = sorted(range(len(flat)), key=lambda j: -len(enc[j]))
        texts: list[str] = [""] * len(flat)
        gen = torch.Generator().manual_seed(seed)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            outs = generate_ids(self.model, [enc[j] for j in idx], max_tokens=max_tokens,
                                eos_ids=self.tok.eos_ids, temperature=temperature, top_p=top_p, generator=gen,
                                stop_check=(lambda ids: _first_stop(self.tok.decode(ids), stop) is not None)
                                if stop else None, max_length=self.max_length)
            for j, ids in zip(idx, outs):
                text = self.tok.decode(ids)
                cut = _first_stop(text, stop)
                texts[j] = text if cut is None else text[:cut]
            if progress_cb is not None:
                progress_cb(len(idx))
        result: list[list[str]] = [[] for _ in prompts]
        for (i, _), t in zip(flat, texts):
            result[i].append(t)
        return result


    def _generate_engine(self, prompts, *, max_tokens, stop, temperature, top_p, n, seed, progress_cb):
        from lmstack.serve.llm import LLM
        from lmstack.serve.types import SamplingParams
        from lmstack.tokenizer import Tokenizer

        P = self.prefix_kv[0][0].shape[-2] if self.prefix_kv is not None else 0
        room = self.max_length - P
        enc = [(self.tok.encode(p) or self.prefix_ids())[-max(1, room - max_tokens):] for p in prompts]
        model_len = min(room, max(len(e) for e in enc) + max_tokens)
        llm = LLM(self.model, Tokenizer.from_dir(self.model_dir), adapter=self.adapter_runtime,
                  max_num_seqs=min(32, max(1, len(enc) * n)), max_model_len=model_len)
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_tokens, stop=[s for s in stop if s], seed=seed,
                                stop_token_ids=list(self.tok.eos_ids))
        outs = llm.generate(enc, params, use_tqdm=False)
        if progress_cb is not None:
            progress_cb(len(enc) * n)
        return [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None
