"""Decode throughput: lmstack's engine vs ``transformers`` ``generate`` on the same random weights.

    .venv/bin/python benchmarks/generate.py                      # tiny + qwen2.5-0.5b shape, batch 1 and 8
    .venv/bin/python benchmarks/generate.py --presets tiny --new-tokens 64

Both run greedy, fp32, with ``torch.set_num_threads(--threads)``, in this process, on a model directory
written once. Decode tokens/s excludes the prefill: ``B * (N - 1) / (t(N) - t(1))`` where t(n) is the
wall time to generate n new tokens for B prompts of --prompt-len tokens (best of --repeats). For the
largest preset the batch-1 figure is also stated as a fraction of the memory-bandwidth bound:
(bandwidth measured here by summing a 1 GiB tensor) / (bytes of weights read per token).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch


def measure_bandwidth(threads: int) -> float:
    """Bytes/s of a streaming read (sum over a 1 GiB fp32 tensor), best of 5."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    n = x.numel() * 4
    del x
    return n / best


def weight_bytes_per_token(model) -> int:
    """Every weight is read once per decode step except the embedding table (one row), unless it is tied to
    lm_head (then it is read once, by lm_head)."""
    cfg = model.config
    n = model.num_parameters()
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return n * model.dtype.itemsize


def time_lmstack(llm, prompts, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate(prompts, temperature=0, max_tokens=n, ignore_eos=True, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    return best


def time_hf(model, prompts, n: int, repeats: int) -> float:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        best = min(best, time.perf_counter() - t)
        assert out.shape[1] == ids.shape[1] + n
    return best


def decode_tps(timer, prompts, n: int, repeats: int) -> float:
    t_n = timer(prompts, n, repeats)
    t_1 = timer(prompts, 1, repeats)
    return len(prompts) * (n - 1) / max(t_n - t_1, 1e-9)


def bench_preset(name: str, args, bandwidth: float | None) -> list[dict]:
    import transformers

    from lmstack.model import build_model, preset, save_model
    from lmstack.serve.llm import LLM
    from lmstack.model.hf_io import load_model

    cfg = preset(name)
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"lmstack_bench_{name}_") as d:
        m = build_model(cfg, device="cpu", dtype="fp32", seed=0)
        save_model(m, d)
        del m
        gc.collect()
        ours = load_model(d, device="cpu", dtype="fp32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        max_b = max(args.batches)
        kv = max_b * (args.prompt_len + args.new_tokens + 32) * 2 * cfg.num_hidden_layers * \
            cfg.num_key_value_heads * cfg.head_dim * 4
        llm = LLM(ours, max_num_seqs=max_b, max_model_len=args.prompt_len + args.new_tokens + 16,
                  kv_cache_memory=kv)
        g = torch.Generator().manual_seed(0)
        for B in args.batches:
            prompts = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
            # warm up both (allocator, first-call overheads) and check they agree
            a = [o.outputs[0].token_ids for o in llm.generate(prompts, temperature=0, max_tokens=8,
                                                              ignore_eos=True, use_tqdm=False)]
            with torch.inference_mode():
                b = hf.generate(torch.tensor(prompts), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[:, args.prompt_len:].tolist()
            agree = sum(x == y for x, y in zip(a, b))
            ours_tps = decode_tps(lambda p, n, r: time_lmstack(llm, p, n, r), prompts, args.new_tokens, args.repeats)
            hf_tps = decode_tps(lambda p, n, r: time_hf(hf, p, n, r), prompts, args.new_tokens, args.repeats)
            row = dict(preset=name, batch=B, lmstack=ours_tps, transformers=hf_tps, ratio=ours_tps / hf_tps,
                       agree=f"{agree}/{B}")
            if bandwidth and B == 1:
                bound = bandwidth / weight_bytes_per_token(ours)
                row["bound"] = bound
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(r: dict) -> str:
    s = (f"{r['preset']:>14}  batch {r['batch']:>2}  lmstack {r['lmstack']:8.1f} tok/s  "
         f"transformers {r['transformers']:8.1f} tok/s  ratio {r['ratio']:5.2f}x  greedy agree {r['agree']}")
    if "bound" in r:
        s += f"  | bandwidth bound {r['bound']:.1f} tok/s, lmstack at {r['lmstack'] / r['bound']:.0%} of it"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "qwen2.5-0.5b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, fp32, "
          f"greedy, prompt {args.prompt_len} tokens, decode tok/s over {args.new_tokens} new tokens")
    bw = measure_bandwidth(args.threads)
    print(f"measured memory bandwidth (1 GiB sum): {bw / 1e9:.1f} GB/s")
    for name in args.presets:
        bench_preset(name, args, bw if name == args.presets[-1] else None)


if __name__ == "__main__":
    main()
