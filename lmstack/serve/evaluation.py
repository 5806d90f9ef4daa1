"""Evaluation's generation on the serving engine: the one decoding loop of lmstack.

:class:`lmstack.eval.lm.EvalLM` scores log-likelihoods itself and leaves generation to this function, which
the layers above the engine pass in (``EvalLM(..., engine=generate)``, ``run_eval(..., engine=generate)``), so
``lmstack eval``, ``lmstack run`` and the lm-evaluation-harness model type decode exactly as ``lmstack serve``
does (paged KV cache, continuous batching, the same sampler and stop handling). The engine wraps the model
object the EvalLM already holds: no second copy of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


def generate(lm: Any, prompts: Sequence[str], *, max_tokens: int = 64, stop: Sequence[str] = (),
             temperature: float = 0.0, top_p: float = 1.0, n: int = 1, seed: int = 0,
             progress_cb: Callable[[int], None] | None = None, python_syntax: bool = False,
             copy: Sequence[Any] | None = None) -> list[list[str]]:
    """``n`` completions per prompt for an :class:`~lmstack.eval.lm.EvalLM` (greedy at temperature 0), cut at
    the first stop string or end-of-turn token. Prompts are cut on the left to fit the model's length.
    ``python_syntax``: keep each completion valid Python as a continuation of its own prompt
    (``StructuredOutput("python", prompt)``, ``lmstack.serve.python_syntax``): for pass@k, where the prompt is a
    function's signature and docstring, every completion that ends (end of turn or a stop string) parses together
    with its prompt; only a ``max_tokens`` cut can leave it unfinished. ``copy``: one
    :class:`~lmstack.serve.types.CopyFrom` (or its fields as a mapping, or None) per prompt, grounded decoding (``lmstack.serve.logits.CopyBias``)."""
    from lmstack.serve.llm import LLM
    from lmstack.serve.types import CopyFrom, SamplingParams, StructuredOutput

    P = lm.prefix_kv[0][0].shape[-2] if lm.prefix_kv is not None else 0  # prompt/prefix-tuning slots
    room = lm.max_length - P
    enc = [(lm.tok.encode(p) or lm.prefix_ids())[-max(1, room - max_tokens):] for p in prompts]
    if not enc:
        return []
    model_len = min(room, max(len(e) for e in enc) + max_tokens)
    llm = LLM(lm.model, lm.tok, adapter=lm.adapter_runtime, max_num_seqs=min(32, max(1, len(enc) * n)),
              max_model_len=model_len)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                            max_tokens=max_tokens, stop=[s for s in stop if s], seed=seed,
                            stop_token_ids=list(lm.eos_ids))
    plist: SamplingParams | list[SamplingParams] = params
    if python_syntax:  # each prompt's own code is the prefix its completion continues
        plist = [dataclasses.replace(params, structured=StructuredOutput("python", p)) for p in prompts]
    if copy is not None:
        if len(copy) != len(prompts):
            raise ValueError(f"copy has {len(copy)} entries for {len(prompts)} prompts")
        base = plist if isinstance(plist, list) else [plist] * len(prompts)
        def grounded(c: Any) -> Any:
            if not isinstance(c, dict):
                return c
            w = c.get("weights")
            return CopyFrom(**{**c, "texts": tuple(c["texts"]), "weights": None if w is None else tuple(w)})

        plist = [dataclasses.replace(q, copy=grounded(c)) for q, c in zip(base, copy)]
    outs = llm.generate(enc, plist, use_tqdm=False)
    if progress_cb is not None:
        progress_cb(len(enc) * n)
    return [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
