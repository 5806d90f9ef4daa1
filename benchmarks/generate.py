"""Decode throughput: lmstack's engine vs ``transformers`` ``generate`` on the same random weights.

    .venv/bin/python benchmarks/generate.py                      # tiny + qwen2.5-0.5b shape, batch 1 and 8
    .venv/bin/python benchmarks/generate.py --presets tiny --new-tokens 64
    python benchmarks/generate.py --device cuda --dtype bfloat16 --presets qwen2.5-0.5b --batches 1 8 32 64

Both run greedy, with ``torch.set_num_threads(--threads)``, in this process, on a model directory written
once, on --device (cpu) in --dtype (fp32). Decode tokens/s excludes the prefill: ``B * (N - 1) / (t(N) - t(1))`` where t(n) is the
wall time to generate n new tokens for B prompts of --prompt-len tokens (best of --repeats). For the
largest preset the batch-1 figure is also stated as a fraction of the memory-bandwidth bound:
(bandwidth measured here by summing a 1 GiB tensor) / (bytes of weights read per token). On CUDA every
timing ends with ``torch.cuda.synchronize()``; ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device = torch.device("cpu")) -> float:
    """Bytes/s of a streaming read (sum over a 1 GiB fp32 tensor), best of 5."""
    x = torch.ones(256 * 1024 * 1024, device=device)
    x.sum()
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        _sync(device)
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
    dev = llm.model.device
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        llm.generate(prompts, temperature=0, max_tokens=n, ignore_eos=True, use_tqdm=False)
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def time_hf(model, prompts, n: int, repeats: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    best = float("inf")
    for _ in range(repeats):
        _sync(model.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        _sync(model.device)
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
    from lmstack.utils.device import resolve_dtype

    cfg = preset(name)
    dev = torch.device(args.device)
    dt = resolve_dtype(args.dtype, dev)
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"lmstack_bench_{name}_") as d:
        m = build_model(cfg, device="cpu", dtype="fp32", seed=0)
        save_model(m, d)
        del m
        gc.collect()
        ours = load_model(d, device=dev, dtype=dt)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt).to(dev).eval()
        max_b = max(args.batches)
        kv = max_b * (args.prompt_len + args.new_tokens + 32) * 2 * cfg.num_hidden_layers * \
            cfg.num_key_value_heads * cfg.head_dim * dt.itemsize
        llm = LLM(ours, max_num_seqs=max_b, max_model_len=args.prompt_len + args.new_tokens + 16,
                  kv_cache_memory=kv)
        g = torch.Generator().manual_seed(0)
        for B in args.batches:
            prompts = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
            # warm up both (allocator, first-call overheads) and check they agree on the first 8 tokens. On
            # CUDA the warm-up runs the full length: kernels that plan per shape (cuDNN attention) meet every
            # key length once; its wall time is reported as the cold tokens/s (prefill included)
            w = args.new_tokens if dev.type == "cuda" else 8
            _sync(dev)
            t = time.perf_counter()
            a = [o.outputs[0].token_ids[:8] for o in llm.generate(prompts, temperature=0, max_tokens=w,
                                                                  ignore_eos=True, use_tqdm=False)]
            t_a = time.perf_counter() - t
            t = time.perf_counter()
            with torch.inference_mode():
                b = hf.generate(torch.tensor(prompts, device=dev), max_new_tokens=w, min_new_tokens=w, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[:, args.prompt_len:args.prompt_len + 8].tolist()
            _sync(dev)
            t_b = time.perf_counter() - t
            agree = sum(x == y for x, y in zip(a, b))
            ours_tps = decode_tps(lambda p, n, r: time_lmstack(llm, p, n, r), prompts, args.new_tokens, args.repeats)
            hf_tps = decode_tps(lambda p, n, r: time_hf(hf, p, n, r), prompts, args.new_tokens, args.repeats)
            row = dict(preset=name, device=str(dev), dtype=str(dt).removeprefix("torch."), batch=B, lmstack=ours_tps, transformers=hf_tps, ratio=ours_tps / hf_tps,
                       agree=f"{agree}/{B}")
            if dev.type == "cuda":
                row.update(lmstack_cold=B * w / t_a, transformers_cold=B * w / t_b)
            if bandwidth and B == 1:
                bound = bandwidth / weight_bytes_per_token(ours)
                row["bound"] = bound
            rows.append(row)
            print(_fmt(row), flush=True)
            if args.profile and name == args.presets[-1] and B in (min(args.batches), max(args.batches)):
                profile(llm, hf, prompts, args.profile, f"{name} {args.dtype} batch {B}", row)
    return rows


def profile(llm, hf, prompts, path: str, label: str, row: dict, n: int = 16) -> None:
    """torch.profiler over n new tokens of each side: the top ops by device time, and device-busy time
    (sum of kernel times) against the wall time, appended to ``path``."""
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if llm.model.device.type == "cuda" else [])
    with open(path, "a") as f:
        for side, fn in (("lmstack", lambda: time_lmstack(llm, prompts, n, 1)),
                         ("transformers", lambda: time_hf(hf, prompts, n, 1))):
            with prof(activities=acts) as p:
                wall = fn()
            ka = p.key_averages()
            # device events only (kernels, copies): summing the ops' own columns would count kernels twice
            dev_us = sum(getattr(e, "self_device_time_total", 0) for e in ka
                         if str(getattr(e, "device_type", "")).endswith("CUDA"))
            launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                             "cudaLaunchKernelExC", "cuLaunchKernelEx"))
            row[f"{side}_device_busy"] = dev_us / 1e6 / wall
            row[f"{side}_launches_per_token"] = launches / n
            f.write(f"\n=== {label}: {side}, {n} new tokens, wall {wall * 1e3:.1f} ms, device busy "
                    f"{dev_us / 1e3:.1f} ms ({dev_us / 1e6 / wall:.0%}), {launches / n:.0f} kernel launches / token\n")
            sort = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
            f.write(ka.table(sort_by=sort, row_limit=25, max_name_column_width=60) + "\n")
        print(f"  profile {label}: device busy lmstack {row['lmstack_device_busy']:.0%} / transformers "
              f"{row['transformers_device_busy']:.0%}; kernel launches per token lmstack "
              f"{row['lmstack_launches_per_token']:.0f} / transformers {row['transformers_launches_per_token']:.0f}",
              flush=True)


def _fmt(r: dict) -> str:
    s = (f"{r['preset']:>14}  batch {r['batch']:>2}  lmstack {r['lmstack']:8.1f} tok/s  "
         f"transformers {r['transformers']:8.1f} tok/s  ratio {r['ratio']:5.2f}x  greedy agree {r['agree']}")
    if "lmstack_cold" in r:
        s += f"  | first pass (prefill incl.) lmstack {r['lmstack_cold']:.1f} / transformers {r['transformers_cold']:.1f} tok/s"
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", help="fp32 or bfloat16 (both sides)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--profile", help="append torch.profiler tables (last preset, smallest and largest batch) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    import transformers

    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device} ({where}), {args.dtype}, "
          f"greedy, prompt {args.prompt_len} tokens, decode tok/s over {args.new_tokens} new tokens")
    bw = measure_bandwidth(dev)
    print(f"measured memory bandwidth (1 GiB sum): {bw / 1e9:.1f} GB/s")
    rows = []
    for name in args.presets:
        rows += bench_preset(name, args, bw if name == args.presets[-1] else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "device": where,
                       "bandwidth_gbs": bw / 1e9, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
