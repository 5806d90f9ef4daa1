"""Decode throughput: lmstack's engine vs ``transformers`` ``generate`` on the same random weights.

    .venv/bin/python benchmarks/generate.py                      # tiny + qwen2.5-0.5b shape, batch 1 and 8
    .venv/bin/python benchmarks/generate.py --presets tiny --new-tokens 64
    python benchmarks/generate.py --device cuda --dtype bfloat16 --presets qwen2.5-0.5b --batches 1 8 32 64 --rounds 1

Both run greedy, with ``torch.set_num_threads(--threads)``, on model directories written once, on --device (cpu)
in --dtype (fp32). Decode tokens/s excludes the prefill: ``B * (N - 1) / (t(N) - t(1))`` where t(n) is the wall
time to generate n new tokens for B prompts of --prompt-len tokens (best of --repeats).

Rounds: each of --rounds rounds runs one worker process per OpenMP wait policy (``OMP_WAIT_POLICY`` is read when
the OpenMP runtime starts, so it needs a process of its own): unset (the runtime's default, spin-then-sleep) and
``PASSIVE``. The order of the policies and of the two libraries inside a worker alternates from round to round, so
both sides see the same load on a shared machine. Each figure is the median over rounds; each library is then
reported under the wait policy that was better FOR IT (``PASSIVE`` helps lmstack's decode kernel under load and
slows ``transformers``), and the ratio compares the two best settings. The load average is printed before, during
and after.

Bandwidth bound (batch 1): bytes of weights read per token / the best streaming rate measured here over a buffer
as large as those weights (so a model that fits in the last-level cache gets the cache's rate, as its decode
does): the best of several multi-threaded passes of a sum, a copy, a triad ``a = b + s * c`` and a matrix-vector
product, every round. A figure above 100% means the bound was not reached by any of them and is flagged. On CUDA
every timing ends with ``torch.cuda.synchronize()``; ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

POLICIES = {"default": None, "passive": "PASSIVE"}  # name -> OMP_WAIT_POLICY (None: unset)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(device: torch.device = torch.device("cpu"), nbytes: int = 1 << 30,
                      reps: int = 5) -> dict[str, float]:
    """Bytes/s of streaming passes over ``nbytes`` of fp32 with the current thread count, best of ``reps`` each:
    ``sum`` (read), ``copy`` (read + write), ``triad`` (``a = b + s * c``: 2 reads + 1 write) and ``gemv`` (a
    matrix-vector product, the access pattern of a batch-1 decode step). Bytes counted as STREAM does (no
    write-allocate traffic), so each is a lower bound on what the memory system moved."""
    n = max(nbytes // 4, 1 << 16) // 4096 * 4096
    x = torch.ones(n, device=device)
    y = torch.ones(n, device=device)
    z = torch.empty(n, device=device)
    m, v = x.view(-1, 4096), torch.ones(4096, device=device)
    b = n * 4
    out = {"sum": b / _best(x.sum, device, reps),
           "copy": 2 * b / _best(lambda: z.copy_(x), device, reps),
           "triad": 3 * b / _best(lambda: torch.add(x, y, alpha=0.5, out=z), device, reps),
           "gemv": b / _best(lambda: torch.mv(m, v), device, reps)}
    del x, y, z, m
    return out


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
    """NaN when the load made t(1) at least t(n) (no decode time left to divide by): such a run is dropped
    from the medians, not reported as a speed."""
    t_n = timer(prompts, n, repeats)
    t_1 = timer(prompts, 1, repeats)
    return len(prompts) * (n - 1) / (t_n - t_1) if t_n > t_1 else float("nan")


def build_dirs(presets: list[str], root: str) -> dict[str, str]:
    """One model directory per preset (random weights, seed 0), written once for every worker."""
    from lmstack.model import build_model, preset, save_model

    dirs = {}
    for name in presets:
        d = dirs[name] = os.path.join(root, name)
        m = build_model(preset(name), device="cpu", dtype="fp32", seed=0)
        save_model(m, d)
        del m
        gc.collect()
    return dirs


def bench_preset(name: str, d: str, args, lmstack_first: bool) -> list[dict]:
    """Both libraries on the model in ``d``: one row per batch size (tok/s of each, greedy agreement), the
    library named first timed first."""
    import transformers

    from lmstack.model.hf_io import load_model
    from lmstack.serve.llm import LLM
    from lmstack.utils.device import resolve_dtype

    dev = torch.device(args.device)
    dt = resolve_dtype(args.dtype, dev)
    rows = []
    ours = load_model(d, device=dev, dtype=dt)
    cfg = ours.config
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt).to(dev).eval()
    max_b = max(args.batches)
    kv = max_b * (args.prompt_len + args.new_tokens + 32) * 2 * cfg.num_hidden_layers * \
        cfg.num_key_value_heads * cfg.head_dim * dt.itemsize
    llm = LLM(ours, max_num_seqs=max_b, max_model_len=args.prompt_len + args.new_tokens + 16, kv_cache_memory=kv)
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
        sides = {"lmstack": lambda p, n, r: time_lmstack(llm, p, n, r),
                 "transformers": lambda p, n, r: time_hf(hf, p, n, r)}
        order = ["lmstack", "transformers"] if lmstack_first else ["transformers", "lmstack"]
        tps = {side: decode_tps(sides[side], prompts, args.new_tokens, args.repeats) for side in order}
        row = dict(preset=name, device=str(dev), dtype=str(dt).removeprefix("torch."), batch=B,
                   lmstack=tps["lmstack"], transformers=tps["transformers"],
                   ratio=tps["lmstack"] / tps["transformers"], agree=f"{agree}/{B}",
                   weight_bytes=weight_bytes_per_token(ours))
        if dev.type == "cuda":
            row.update(lmstack_cold=B * w / t_a, transformers_cold=B * w / t_b)
        rows.append(row)
        if args.profile and name == args.presets[-1] and B in (min(args.batches), max(args.batches)):
            profile(llm, hf, prompts, args.profile, f"{name} {args.dtype} batch {B}", row)
    del llm, ours, hf
    gc.collect()
    return rows


def worker(args) -> dict:
    """One round under one wait policy (set by the parent in this process's environment)."""
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dirs = json.loads(args.dirs)
    rnd = args.worker_round
    rows, bw = [], {}
    for name in args.presets:
        d = dirs[name]
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        bw[name] = measure_bandwidth(dev, min(size, 1 << 30))  # the working set of the weights (DRAM past 1 GiB)
        rows += bench_preset(name, d, args, lmstack_first=rnd % 2 == 0)
    return {"rows": rows, "bandwidth": bw, "bandwidth_1gib": measure_bandwidth(dev, 1 << 30),
            "load": os.getloadavg()}


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
    s = (f"{r['preset']:>14}  batch {r['batch']:>2}  lmstack {r['lmstack']:8.1f} tok/s ({r.get('lmstack_policy', '-')})  "
         f"transformers {r['transformers']:8.1f} tok/s ({r.get('transformers_policy', '-')})  "
         f"ratio {r['ratio']:5.2f}x  greedy agree {r['agree']}")
    for pol, m in r.get("per_policy", {}).items():
        s += f"\n{'':>16}{pol:>7}: lmstack {m['lmstack']:8.1f}  transformers {m['transformers']:8.1f}  {m['ratio']:5.2f}x"
    if "lmstack_cold" in r:
        s += f"  | first pass (prefill incl.) lmstack {r['lmstack_cold']:.1f} / transformers {r['transformers_cold']:.1f} tok/s"
    if "bound" in r:
        frac = r["lmstack"] / r["bound"]
        s += f"\n{'':>16}bandwidth bound {r['bound']:.1f} tok/s, lmstack at {frac:.0%} of it"
        if frac > 1:
            s += " (ABOVE the bound: the bandwidth measurement did not reach what the decode moved)"
    return s


def _load() -> str:
    return "load average {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "qwen2.5-0.5b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians over them")
    ap.add_argument("--wait-policies", nargs="+", choices=list(POLICIES), default=None,
                    help="OpenMP wait policies to try per library (default: both on CPU, the runtime's on CUDA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", help="fp32 or bfloat16 (both sides)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--profile", help="append torch.profiler tables (last preset, smallest and largest batch) here")
    ap.add_argument("--worker-round", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dirs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    if args.worker_round is not None:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    import transformers

    dev = torch.device(args.device)
    policies = args.wait_policies or (["default", "passive"] if dev.type == "cpu" else ["default"])
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{args.threads} threads"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device} ({where}), {args.dtype}, "
          f"greedy, prompt {args.prompt_len} tokens, decode tok/s over {args.new_tokens} new tokens, best of "
          f"{args.repeats}; {args.rounds} alternating rounds x OMP wait policies {policies}")
    print(f"start: {_load()} on {os.cpu_count()} cores", flush=True)
    runs: list[dict] = []  # one per (round, policy)
    with tempfile.TemporaryDirectory(prefix="lmstack_bench_gen_") as root:
        dirs = build_dirs(args.presets, root)
        base = [sys.executable, __file__, "--presets", *args.presets, "--batches", *map(str, args.batches),
                "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeats",
                str(args.repeats), "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
                "--dirs", json.dumps(dirs)]
        for rnd in range(args.rounds):
            for pol in (policies if rnd % 2 == 0 else policies[::-1]):
                env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
                env.update(OMP_NUM_THREADS=str(args.threads), LMSTACK_NO_PROGRESS="1")
                if POLICIES[pol]:
                    env["OMP_WAIT_POLICY"] = POLICIES[pol]
                extra = ["--profile", args.profile] if args.profile and rnd == 0 and pol == policies[0] else []
                out = subprocess.run(base + ["--worker-round", str(rnd)] + extra, env=env, capture_output=True,
                                     text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    print(f"round {rnd + 1} {pol}: failed\n{out.stderr[-3000:]}", flush=True)
                    continue
                r = json.loads(line[0][7:])
                r.update(round=rnd, policy=pol)
                runs.append(r)
                first = "lmstack" if rnd % 2 == 0 else "transformers"
                for row in r["rows"]:
                    print(f"round {rnd + 1} {pol:>7} ({first} first): {row['preset']:>14} batch {row['batch']:>2}  "
                          f"lmstack {row['lmstack']:8.1f}  transformers {row['transformers']:8.1f} tok/s  "
                          f"{row['ratio']:5.2f}x  agree {row['agree']}", flush=True)
                print(f"round {rnd + 1} {pol:>7}: load average {r['load'][0]:.2f} at its end", flush=True)
    rows = summarize(runs, args, policies)
    print(f"end: {_load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "device": where,
                       "args": vars(args), "runs": runs, "rows": rows}, f, indent=1)


def summarize(runs: list[dict], args, policies: list[str]) -> list[dict]:
    """Median over rounds per (preset, batch, library, policy); each library under its better policy."""
    bw: dict[str, float] = {}
    for r in runs:
        for name, b in r["bandwidth"].items():
            bw[name] = max(bw.get(name, 0.0), max(b.values()))
    if runs:
        best1 = max(max(r["bandwidth_1gib"].values()) for r in runs)
        print(f"memory bandwidth, best of sum / copy / triad / gemv over all rounds: 1 GiB buffer "
              f"{best1 / 1e9:.1f} GB/s; " + ", ".join(f"{n} (buffer of its weights' size) {v / 1e9:.1f} GB/s"
                                                       for n, v in bw.items()))
    out = []
    print("median over rounds (tok/s); each library under its better wait policy:")
    for name in args.presets:
        for B in args.batches:
            med: dict[tuple[str, str], float] = {}
            extra: dict = {}
            for pol in policies:
                rs = [row for r in runs if r["policy"] == pol for row in r["rows"]
                      if row["preset"] == name and row["batch"] == B]
                if not rs:
                    continue
                ok = [x for x in rs if x["ratio"] == x["ratio"]]  # NaN: a timing the load made meaningless
                if len(ok) < len(rs):
                    print(f"  {name} batch {B} {pol}: {len(rs) - len(ok)} of {len(rs)} rounds dropped (t(1) >= t(n))")
                if not ok:
                    continue
                for side in ("lmstack", "transformers", "ratio"):
                    med[(side, pol)] = statistics.median(x[side] for x in ok)
                extra = ok[0]
            if not med:
                continue
            best = {side: max((med[(side, p)], p) for p in policies if (side, p) in med)
                    for side in ("lmstack", "transformers")}
            row = dict(preset=name, batch=B, device=extra.get("device"), dtype=extra.get("dtype"),
                       lmstack=best["lmstack"][0], lmstack_policy=best["lmstack"][1],
                       transformers=best["transformers"][0], transformers_policy=best["transformers"][1],
                       ratio=best["lmstack"][0] / best["transformers"][0], agree=extra.get("agree"),
                       rounds=sum(1 for r in runs if r["policy"] == best["lmstack"][1]),
                       per_policy={p: {s: med[(s, p)] for s in ("lmstack", "transformers", "ratio")}
                                   for p in policies if ("lmstack", p) in med})
            for k in ("lmstack_cold", "transformers_cold"):
                if k in extra:
                    row[k] = extra[k]
            if B == 1 and name in bw:
                row["bound"] = bw[name] / extra["weight_bytes"]
            out.append(row)
            print(_fmt(row), flush=True)
    return out


if __name__ == "__main__":
    main()
