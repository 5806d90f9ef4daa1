"""Training throughput: lmstack ``fit`` vs a plain PyTorch loop over transformers ``LlamaForCausalLM``.

Same model config and initial weights (the lmstack model is saved and loaded by transformers), same data
(random tokens, batch 8 x 256), same AdamW hyperparameters, gradient clipping 1.0, fp32, 2 threads.
Each variant runs in its own subprocess (so peak RSS is per variant), one after another, for --rounds rounds whose
variant order alternates (so each sees the same load on a shared machine); medians over rounds are reported:

    lmstack        fit() as shipped (fused AdamW, token-weighted loss, metrics every step)
    lmstack+ac     the same with activation checkpointing per block
    lmstack+compile  (--compile) torch.compile per block
    transformers   LlamaForCausalLM(input_ids, labels=...).loss, torch.optim.AdamW defaults (foreach)

Reported: median tokens/s over the timed steps (then the median over rounds), MFU against a matmul peak measured here (fp32, same
threads; bf16 on CUDA), and peak memory (RSS on CPU, max allocated on CUDA). Usage::

    .venv/bin/python benchmarks/train.py [--presets tiny,small] [--steps 8] [--threads 2] [--compile]
    python benchmarks/train.py --device cuda --batch 32 --presets small --compile
    python benchmarks/train.py --device cuda --presets 100m --batch 16 --seq 1024 --steps 200 --compile --json t.json

Besides lmstack's presets, ``--presets`` takes the benchmark-only shapes in ``SHAPES`` (``100m``: a ~100M
parameter Llama, GPT-2-small sized: 100M without the input embedding, 124.7M with it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, SEQ, WARMUP = 8, 256, 2

# benchmark-only shapes: a preset plus overrides (lmstack's presets stop at ~30M before the 0.5B shape)
SHAPES = {
    # 12 x 768, GQA 12/4 heads, SwiGLU 2048, 32k vocabulary, untied: 75.5M in the layers + 24.6M lm_head = 100M
    # counted by MFU (6N), 124.7M with the input embedding
    "100m": ("small", dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)),
}


def model_config(name: str):
    from lmstack.model import preset

    if name in SHAPES:
        base, over = SHAPES[name]
        return preset(base, **over)
    return preset(name)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(variant: str, preset_name: str, steps: int, threads: int, device: str, batch: int,
           peak: float, seq: int = SEQ) -> dict:
    import contextlib

    import torch

    torch.set_num_threads(threads)
    from lmstack.model import build_model, save_model
    from lmstack.train import TrainConfig, causal_lm_loss, fit
    from lmstack.train.flops import flops_per_token

    cuda = device == "cuda"
    amp = torch.bfloat16 if cuda else torch.float32  # bf16 autocast on GPU (both sides), fp32 on CPU
    mc = model_config(preset_name)
    model = build_model(mc, device="cpu", dtype="fp32", seed=0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, mc.vocab_size, (steps + WARMUP, batch, seq + 1), generator=g)
    fpt = flops_per_token(model, seq)
    times: list[float] = []
    rss0 = _rss_mib()
    if variant.startswith("lmstack"):
        class Src:
            i = 0

            def __next__(self):
                w = data[self.i % len(data)]
                self.i += 1
                return {"input_ids": w[:, :-1], "targets": w[:, 1:]}

        with tempfile.TemporaryDirectory() as run:
            cfg = TrainConfig(steps=steps + WARMUP, warmup_steps=1, lr=3e-4, log_every=1, eval_every=0,
                              ckpt_every=0, save_final=False, plot=False, tensorboard=False, peak_flops=peak,
                              device=device, dtype="bf16" if cuda else "fp32", activation_checkpointing=variant.endswith("+ac"),
                              compile=variant.endswith("+compile"))
            fit(model, Src(), causal_lm_loss, cfg, run)
            recs = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]
            times = [batch * seq / r["tokens_per_s"] for r in recs if "loss" in r][WARMUP:]
    else:
        import transformers

        with tempfile.TemporaryDirectory() as d:
            save_model(model, d)
            del model
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).train()
        decay = [p for p in hf.parameters() if p.ndim >= 2]
        other = [p for p in hf.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), fused=cuda or None)
        rss0 = _rss_mib()
        for i in range(steps + WARMUP):
            t0 = time.perf_counter()
            w = data[i].to(device)
            ctx = torch.autocast("cuda", dtype=amp) if cuda else contextlib.nullcontext()
            with ctx:
                loss = hf(input_ids=w[:, :-1], labels=w[:, :-1]).loss  # transformers shifts labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tps = batch * seq / step_s
    mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib()
    if cuda:
        torch.cuda.synchronize()
    return {"variant": variant, "preset": preset_name, "params_M": mc.num_parameters() / 1e6, "batch": batch,
            "seq": seq, "steps": steps, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "tokens_per_s": tps, "step_s": step_s, "mfu": fpt * tps / peak, "peak_gflops": peak / 1e9,
            "peak_mem_mib": mem, "rss_before_steps_mib": rss0}


def summary_lines(med: dict[tuple[str, str], dict], presets: list[str], variants: list[str],
                  mem: str = "peak RSS") -> list[str]:
    """One line per (preset, variant) with its median tokens/s; every variant but the baseline also gets its ratio
    to ``transformers`` (whatever order ``--variants`` gave)."""
    lines = []
    for p in presets:
        base = med.get((p, "transformers"))
        for v in variants:
            r = med.get((p, v))
            if r is None:
                continue
            line = (f"{p:>6} ({r['params_M']:.1f}M) {v:<16} {r['tokens_per_s']:8.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
                    f"{mem} {r['peak_mem_mib']:7.0f} MiB  rounds {' / '.join(f'{x:.0f}' for x in r['rounds'])}")
            if base and v != "transformers":
                per = [x / y for x, y in zip(r["rounds"], base["rounds"])]
                line += (f"  -> {v} / transformers = {r['tokens_per_s'] / base['tokens_per_s']:.2f}x "
                         f"(per round {' / '.join(f'{x:.2f}' for x in per)})")
            lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warmup steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time lmstack with train.compile=true")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast on both sides)")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per row")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, variant order alternating; medians reported")
    ap.add_argument("--variants", help="comma-separated subset of transformers,lmstack,lmstack+ac,lmstack+compile")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "PRESET"), help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], a.worker[1], a.steps, a.threads, a.device, a.batch,
                                            a.peak, a.seq)))
        return
    import torch

    from lmstack.train.flops import measure_matmul_peak

    torch.set_num_threads(a.threads)
    # one peak for every variant: the best of 2 s of (n x n) matmuls in this process
    peak = measure_matmul_peak(a.device, torch.bfloat16 if a.device == "cuda" else torch.float32, seconds=2.0)
    variants = ["transformers", "lmstack", "lmstack+ac"] + (["lmstack+compile"] if a.compile else [])
    if a.variants:
        variants = a.variants.split(",")
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")]))}
    mem = "peak CUDA memory" if a.device == "cuda" else "peak RSS"
    print(f"torch {torch.__version__}, device {a.device}, batch {a.batch} x {a.seq} tokens, {'bf16 autocast' if a.device == 'cuda' else 'fp32'}, {a.threads} threads, {a.steps} timed steps; "
          f"load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    results: dict[tuple[str, str], list[dict]] = {}
    presets = a.presets.split(",")
    for p in presets:
        for rnd in range(a.rounds):  # the order alternates, so every variant sees the same load on a shared machine
            for v in (variants if rnd % 2 == 0 else variants[::-1]):
                out = subprocess.run([sys.executable, __file__, "--worker", v, p, "--steps", str(a.steps),
                                      "--threads", str(a.threads), "--device", a.device, "--batch", str(a.batch),
                                      "--seq", str(a.seq), "--peak", str(peak)], env=env, capture_output=True,
                                     text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    print(f"{p} {v}: failed\n{out.stderr[-2000:]}")
                    continue
                r = json.loads(line[0][7:])
                r.update(round=rnd + 1, load_after=os.getloadavg()[0])
                results.setdefault((p, v), []).append(r)
                print(f"round {rnd + 1} {p:>6} ({r['params_M']:.1f}M) {v:<16} {r['tokens_per_s']:8.0f} tok/s  "
                      f"MFU {100 * r['mfu']:5.1f}%  {mem} {r['peak_mem_mib']:7.0f} MiB  load {r['load_after']:.1f}",
                      flush=True)
    med: dict[tuple[str, str], dict] = {}
    for key, rs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        med[key] = {**rs[0], "tokens_per_s": tps, "step_s": a.batch * a.seq / tps, "mfu": rs[0]["mfu"] * tps /
                    rs[0]["tokens_per_s"], "rounds": [r["tokens_per_s"] for r in rs],
                    "peak_mem_mib": max(r["peak_mem_mib"] for r in rs)}
    print(f"median over {a.rounds} round(s):")
    for line in summary_lines(med, presets, variants, mem):
        print(line)
    print(f"load average at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        rows = []
        for (p, _), r in med.items():
            base = med.get((p, "transformers"))
            rows.append({**r, "ratio_vs_transformers": r["tokens_per_s"] / base["tokens_per_s"] if base else None})
        Path(a.json).write_text(json.dumps({"torch": torch.__version__, "peak_flops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
