"""Tensor parallelism in the serving engine (lmstack/serve/tp.py): the same model served by one process and split
over 2 (gloo on CPU), in one run. Reports decode tokens/s at batch 1 and 8, prefill tokens/s, and what each rank
holds (weights, KV bytes per block). Baseline: lmstack's own single-process engine, on the eager path (what the
TP ranks run) and with the compiled CPU decode kernel (the default single-process path).

The model is a random Qwen2-shaped decoder (heads and kv heads divisible by 2; SmolLM2-135M's 9 heads / 3 kv
heads do not split over 2 ranks). On CPU the ranks share the machine's cores (each rank gets threads / tp):
expect no speed-up on 2 cores -- the point is the memory split and the CUDA (NCCL, one GPU per rank) path.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engine_tp.py [--threads 2] [--layers 8] [--hidden 512] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_model(path: Path, layers: int, hidden: int) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                   max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.05)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)


CASES = {"decode_b1": ([list(range(10, 26))], 32), "decode_b8": ([list(range(10 + i, 26 + i)) for i in range(8)], 32),
         "prefill": ([list(range(100, 612))], 1)}


def once(llm, threads: int, case: str) -> tuple[float, list[int]]:
    """Tokens/s of one run of ``case`` (decode: generated tokens; prefill: prompt tokens)."""
    prompts, n = CASES[case]
    torch.set_num_threads(threads)  # tp2's rank 0 runs with threads / 2, like its worker
    t = time.perf_counter()
    outs = llm.generate(prompts, temperature=0, max_tokens=n, ignore_eos=True, use_tqdm=False)
    dt = time.perf_counter() - t
    done = len(prompts[0]) if case == "prefill" else len(prompts) * n
    return done / dt, outs[0].outputs[0].token_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lmstack.serve.llm import load

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m"
        make_model(path, args.layers, args.hidden)
        engines = {}
        half = max(1, args.threads // 2)
        # "tp1 eager 1/2": one process with the threads of one tp2 rank -- on a loaded machine OpenMP threads that
        # meet at barriers slow down far more than one thread (see ThreadTuner in lmstack/serve/runner.py), so the
        # tp2 / tp1 ratio is read against both
        for name, kw, th in [("tp1 kernel", {}, args.threads), ("tp1 eager", {"use_kernel": False}, args.threads),
                             ("tp1 eager 1/2", {"use_kernel": False}, half), ("tp2", {"tensor_parallel": 2}, half)]:
            torch.set_num_threads(args.threads)
            engines[name] = (load(path, max_num_seqs=8, **kw), th)
        rows = {name: {"params": sum(p.numel() for p in llm.model.parameters()),
                       "kv_block": llm.engine.runner.kv_bytes_per_block(llm.model, llm.engine.runner.block_size)}
                for name, (llm, _) in engines.items()}
        for name, (llm, th) in engines.items():
            once(llm, th, "decode_b1")  # warm-up
        # interleaved: every repetition times each engine once, so a change in the machine's load hits all of them
        samples: dict[str, dict[str, list[float]]] = {n: {c: [] for c in CASES} for n in engines}
        for _ in range(args.reps):
            for case in CASES:
                for name, (llm, th) in engines.items():
                    tps, toks = once(llm, th, case)
                    samples[name][case].append(tps)
                    if case == "decode_b1":
                        rows[name]["tokens"] = toks
        for name in engines:
            rows[name].update({c: statistics.median(v) for c, v in samples[name].items()})
        engines["tp2"][0].close()
        torch.set_num_threads(args.threads)
    base = rows["tp1 eager"]
    print(f"model: qwen2-shaped, {args.layers} layers, hidden {args.hidden}, 8 heads / 4 kv heads, vocab 32000; "
          f"torch threads {args.threads} (tp2: {max(1, args.threads // 2)} per rank)")
    print(f"{'engine':<14}{'decode b1 tok/s':>17}{'decode b8 tok/s':>17}{'prefill tok/s':>15}"
          f"{'params/rank':>13}{'KV B/block/rank':>17}")
    for name, x in rows.items():
        print(f"{name:<14}{x['decode_b1']:>17.1f}{x['decode_b8']:>17.1f}{x['prefill']:>15.0f}"
              f"{x['params'] / 1e6:>12.1f}M{x['kv_block']:>17d}")
    x = rows["tp2"]
    print(f"tp2 / tp1 eager: decode b1 {x['decode_b1'] / base['decode_b1']:.2f}x, decode b8 "
          f"{x['decode_b8'] / base['decode_b8']:.2f}x, prefill {x['prefill'] / base['prefill']:.2f}x; "
          f"params per rank {x['params'] / base['params']:.2f}x, KV per rank {x['kv_block'] / base['kv_block']:.2f}x")
    y = rows["tp1 eager 1/2"]
    print(f"tp2 / tp1 eager with {half} thread(s): decode b1 {x['decode_b1'] / y['decode_b1']:.2f}x, decode b8 "
          f"{x['decode_b8'] / y['decode_b8']:.2f}x, prefill {x['prefill'] / y['prefill']:.2f}x")
    print("greedy tokens equal (tp2 vs tp1 eager):", x["tokens"] == base["tokens"])


if __name__ == "__main__":
    main()
