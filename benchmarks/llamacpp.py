"""Batch-1 decode: lmstack (compiled CPU kernel) vs llama.cpp (llama-cpp-python) on the same weights, at matched
precision: lmstack fp32 / int8 / int4 (group 32, ``lmstack quantize``) vs llama.cpp f32 / q8_0 / q4_0
(``lmstack export --format gguf``; both keep the output matrix at 8 bits in the quantized files).

    .venv/bin/python benchmarks/llamacpp.py                                     # tiny, qwen2.5-0.5b shape, smollm2
    .venv/bin/python benchmarks/llamacpp.py --models qwen2.5-0.5b --rounds 3 --threads 2 --rss

lmstack's quantized rows use the kernel's default int8-activation path (integer dot products); the same model is
also timed through its fp32-widening path (``LMSTACK_KERNEL_ACT_Q8=0``) and printed beside it.
Both run greedy in this process with ``torch.set_num_threads(--threads)`` / ``n_threads=--threads``, after a
64-token prompt (--prompt-len), on --new-tokens decode steps; prefill is excluded on both sides (the N steps
timed follow the step that read the prompt). Each round times every
precision of lmstack then of llama.cpp, rounds alternate, the median of --rounds is printed with the ratio.
Beside each figure: the bytes of weights read per token (lmstack: every matrix as stored + norms; llama.cpp:
every tensor of the file but the embedding, which is read once when tied as the output) and the bound
``bandwidth / bytes`` (bandwidth measured here by summing a 1 GiB tensor), and tokens per CPU-second of the
process (with ``--threads 1`` the compute each side spends per token, which a loaded machine changes little;
with more threads it also counts spin-waiting). ``--rss``: each side also loads and
decodes in a child process of its own and its peak resident memory (VmHWM) is printed, with lmstack's stored
weights (every parameter / buffer storage once) + the KV cache of the tokens held, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import measure_bandwidth  # noqa: E402
from quant import model_dir  # noqa: E402

PAIRS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def lmstack_bytes_per_token(model) -> int:
    """Bytes of every parameter and buffer but the embedding table (one row per token) unless lm_head is it."""
    emb = model.model.embed_tokens.weight
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or (t is emb and model.lm_head.weight is not emb):
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


def gguf_bytes_per_token(path: Path) -> int:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    tied = "output.weight" not in names
    return sum(v for k, v in names.items() if k != "token_embd.weight" or tied)


class Lmstack:
    def __init__(self, path: Path, max_len: int):
        import lmstack

        self.llm = lmstack.load(path, max_num_seqs=1, max_model_len=max_len)
        self.bytes = lmstack_bytes_per_token(self.llm.model)
        assert self.llm.engine.kernel_reason is None, self.llm.engine.kernel_reason

    def run(self, prompt: list[int], n: int) -> list[int]:
        out = self.llm.generate([prompt], temperature=0, max_tokens=n, ignore_eos=True, use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    def tps(self, prompt: list[int], n: int) -> float:
        """Decode steps after the prefill step (the step that samples the first token), as llama.cpp's."""
        from lmstack.serve.types import SamplingParams

        eng = self.llm.engine
        req = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
        while not req.seqs[0].output_token_ids:
            eng.step()
        t, c = time.perf_counter(), time.process_time()
        while eng.has_unfinished_requests():
            eng.step()
        self.cpu_tps = n / (time.process_time() - c)
        return n / (time.perf_counter() - t)


class LlamaCpp:
    def __init__(self, path: Path, threads: int, max_len: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=max_len, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False, seed=0)
        self.bytes = gguf_bytes_per_token(path)

    def run(self, prompt: list[int], n: int, timed: bool = False):
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        t, c = time.perf_counter(), time.process_time()
        out = []
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        self.cpu_tps = n / (time.process_time() - c)
        return (n / (time.perf_counter() - t)) if timed else out

    def tps(self, prompt: list[int], n: int) -> float:
        return self.run(prompt, n, timed=True)


def _child(args) -> None:
    """--child SIDE PATH: load, decode, print peak RSS (MiB) as JSON."""
    side, path = args.child
    torch.set_num_threads(args.threads)
    prompt = list(range(3, 3 + args.prompt_len))
    eng = Lmstack(Path(path), args.prompt_len + args.new_tokens + 16) if side == "lmstack" else \
        LlamaCpp(Path(path), args.threads, args.prompt_len + args.new_tokens + 16)
    eng.run(prompt, 16)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big parent would report the parent's
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    out = {"rss_mib": hwm / 1024}
    if side == "lmstack":  # what the run needs: every stored weight once + the KV of the tokens it holds
        m = eng.llm.model
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in list(m.parameters()) + list(m.buffers())}
        c = m.config
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * (args.prompt_len + 16)
        out.update(weights_mib=sum(storages.values()) / 2**20, kv_mib=kv / 2**20)
    print(json.dumps(out))


def peak_rss(side: str, path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, str(path), "--threads", str(args.threads),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "LMSTACK_NO_PROGRESS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, args, root: Path, bandwidth: float) -> list[dict]:
    from lmstack.export import export_gguf
    from lmstack.quant import quantize_checkpoint

    src = model_dir(name, root)
    dirs = {"fp32": src}
    for p in args.precisions:
        if p == "int8":
            dirs[p] = quantize_checkpoint(src, root / f"{name}-int8", method="int8")
        elif p == "int4":
            dirs[p] = quantize_checkpoint(src, root / f"{name}-int4", method="int4", group_size=32)
    files = {p: export_gguf(src, root / f"{name}-{PAIRS[p]}.gguf", dtype=PAIRS[p], modelfile=False)
             for p in args.precisions}
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, min(vocab, 300), (args.prompt_len,), generator=g).tolist()
    max_len = args.prompt_len + args.new_tokens + 16
    rows = []
    for p in args.precisions:  # one pair loaded at a time; its rounds alternate lmstack / llama.cpp
        ours, theirs = Lmstack(dirs[p], max_len), LlamaCpp(files[p], args.threads, max_len)
        a, b = ours.run(prompt, 16), theirs.run(prompt, 16)  # warm-up; the first 16 greedy tokens compared
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 16)
        t_ours, t_theirs, c_ours, c_theirs = [], [], [], []
        for _ in range(args.rounds):
            t_ours.append(ours.tps(prompt, args.new_tokens))
            c_ours.append(ours.cpu_tps)
            t_theirs.append(theirs.tps(prompt, args.new_tokens))
            c_theirs.append(theirs.cpu_tps)
        widen = {}
        if p != "fp32":  # the same loaded model through the kernel's fp32-widening path (exact, no int8 activations)
            k = ours.llm.engine.runner.kernel
            k.act_q8 = 0
            w = ours.run(prompt, 16)
            widen = dict(lmstack_widen_tps=statistics.median(ours.tps(prompt, args.new_tokens) for _ in range(args.rounds)),
                         lmstack_widen_tokens_per_cpu_s=ours.cpu_tps,
                         same_greedy_q8_vs_widen=next((i for i, (x, y) in enumerate(zip(a, w)) if x != y), 16))
            k.act_q8 = 1
        x, y = statistics.median(t_ours), statistics.median(t_theirs)
        row = dict(model=name, lmstack=p, llamacpp=PAIRS[p], lmstack_tps=x, llamacpp_tps=y, ratio=x / y,
                   lmstack_mb=ours.bytes / 1e6, llamacpp_mb=theirs.bytes / 1e6,
                   lmstack_bound=bandwidth / ours.bytes, llamacpp_bound=bandwidth / theirs.bytes,
                   same_greedy=agree, rounds_lmstack=[round(v, 1) for v in t_ours],
                   rounds_llamacpp=[round(v, 1) for v in t_theirs], load=os.getloadavg()[0],
                   lmstack_tokens_per_cpu_s=statistics.median(c_ours),
                   llamacpp_tokens_per_cpu_s=statistics.median(c_theirs), **widen)
        del ours, theirs
        if args.rss:
            mine = peak_rss("lmstack", dirs[p], args)
            row["lmstack_rss_mib"], row["lmstack_weights_kv_mib"] = mine["rss_mib"], mine["weights_mib"] + mine["kv_mib"]
            row["llamacpp_rss_mib"] = peak_rss("llamacpp", files[p], args)["rss_mib"]
        print(_fmt(row), flush=True)
        rows.append(row)
    return rows


def _fmt(r: dict) -> str:
    s = (f"{r['model']:>13} {r['lmstack']:>4} vs {r['llamacpp']:<5} lmstack {r['lmstack_tps']:7.1f} tok/s "
         f"(bound {r['lmstack_bound']:6.1f}, {r['lmstack_mb']:6.0f} MB/token)  llama.cpp {r['llamacpp_tps']:7.1f} "
         f"(bound {r['llamacpp_bound']:6.1f}, {r['llamacpp_mb']:6.0f} MB/token)  ratio {r['ratio']:.2f}x  "
         f"same first greedy tokens {r['same_greedy']}/16  rounds {r['rounds_lmstack']} / {r['rounds_llamacpp']}  "
         f"load {r['load']:.1f}  tokens per CPU-second {r['lmstack_tokens_per_cpu_s']:.1f} vs "
         f"{r['llamacpp_tokens_per_cpu_s']:.1f}")
    if "lmstack_widen_tps" in r:
        s += (f"  (lmstack fp32-widening path {r['lmstack_widen_tps']:.1f} tok/s, {r['lmstack_widen_tokens_per_cpu_s']:.1f} "
              f"tokens per CPU-second; its first greedy tokens equal the int8-activation path's for "
              f"{r['same_greedy_q8_vs_widen']}/16)")
    if "lmstack_rss_mib" in r:
        s += (f"  peak RSS {r['lmstack_rss_mib']:.0f} vs {r['llamacpp_rss_mib']:.0f} MiB (lmstack weights + KV "
              f"{r['lmstack_weights_kv_mib']:.0f} MiB, peak / that {r['lmstack_rss_mib'] / r['lmstack_weights_kv_mib']:.2f}x)")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "qwen2.5-0.5b", "smollm2"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"], choices=list(PAIRS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rss", action="store_true", help="also peak RSS of each side in a child process")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    bw = measure_bandwidth()["sum"]  # streaming read (generate.measure_bandwidth)
    print(f"measured read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmstack_llamacpp_") as d:
        for name in args.models:
            rows += bench(name, args, Path(d), bw)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
