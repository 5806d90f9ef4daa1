"""Serving load test: ``lmstack serve`` vs a one-request-at-a-time ``transformers`` server, same API, same run.

    .venv/bin/python benchmarks/serve.py                       # tiny preset, concurrency 16, + prefix-cache run
    .venv/bin/python benchmarks/serve.py --request-rate 8      # Poisson arrivals (8 req/s), still capped at -c
    .venv/bin/python benchmarks/serve.py --model DIR --skip-prefix

An OpenAI-API load client (asyncio + httpx, streaming ``/v1/completions`` with token-id prompts of exactly
--prompt-len tokens, ``max_tokens`` = --output-len with ``ignore_eos``, greedy) reports per server:
request throughput, output tokens/s, time-to-first-token (TTFT) p50/p99, inter-token latency (ITL: gaps
between streamed chunks) p50/p99 and time per output token (TPOT: (e2e - TTFT) / (tokens - 1)) p50/p99.

Servers (each alone on the machine while measured, started as subprocesses with OMP_NUM_THREADS=--threads):
  * lmstack:  ``python -m lmstack.cli serve --model DIR`` (paged KV cache, continuous batching, prefix cache)
  * baseline: this file's ``--serve-baseline`` mode: :class:`benchmarks.hf_engine.HFEngine`
    (``transformers`` ``generate``, one request at a time) behind the same FastAPI app.

Prefix-cache run: every prompt is one shared --prefix-len-token system prompt plus 32 unique tokens; lmstack
with and without ``--no-prefix-caching`` (and the baseline) report TTFT, whose ratio is the caching gain.
Model: by default the ``tiny`` preset with random weights and a small trained BPE, written to a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.hf_engine, when run as a script


# ------------------------------------------------------------------------------------------------ model
def build_tiny(out: Path, max_len: int) -> Path:
    """The ``tiny`` preset (8 layers, 256 wide, vocab 8192) with random weights and a BPE trained on random words."""
    from lmstack.model import build_model, preset, save_model
    from lmstack.tokenizer import train_tokenizer

    rng = random.Random(0)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choice(letters[: rng.randint(8, 26)]) for _ in range(rng.randint(2, 9)))
             for _ in range(30000)]
    corpus = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(3000)]
    tok_dir = out / "tok"
    tok = train_tokenizer(corpus, vocab_size=preset("tiny").vocab_size, out_dir=tok_dir, show_progress=False)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, max_position_embeddings=max_len,
                                 eos_token_id=tok.token_to_id("<|im_end|>"))
    model = build_model(cfg, device="cpu", dtype=torch.float32, seed=0)
    return save_model(model, out / "tiny", tokenizer_dir=tok_dir)


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1:<free port>; stopped with SIGTERM (graceful drain)."""

    def __init__(self, argv: list[str], threads: int, name: str):
        self.port, self.name = free_port(), name
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LMSTACK_NO_PROGRESS": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not start in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def lmstack_server(model: Path, args, prefix_caching: bool = True) -> Server:
    argv = [sys.executable, "-m", "lmstack.cli", "serve", "--model", str(model), "--served-model-name", "bench",
            "--max-num-seqs", str(max(args.concurrency, 16)), "--log-level", "warning", "--device", "cpu",
            "--dtype", "float32"]
    if not prefix_caching:
        argv.append("--no-prefix-caching")
    return Server(argv, args.threads, "lmstack" if prefix_caching else "lmstack (no prefix cache)")


def baseline_server(model: Path, args) -> Server:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-baseline", "--model", str(model),
            "--threads", str(args.threads)]
    return Server(argv, args.threads, "baseline (HF generate, 1 at a time)")


def serve_baseline(model: str, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    from lmstack.serve.api import build_server, create_app
    from benchmarks.hf_engine import HFEngine

    app = create_app(HFEngine(model), served_model_name="bench")
    build_server(app, port=port, log_level="warning").run()


# ------------------------------------------------------------------------------------------------ client
@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


async def one_request(client, url: str, prompt: list[int], output_len: int) -> Result:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    r = Result()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    r.tokens = ev["usage"]["completion_tokens"]
                if any(c.get("text") for c in ev.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001 - counted and reported, not fatal
        r.error = f"{type(e).__name__}: {e}"
    r.e2e = time.perf_counter() - t0
    return r


async def run_load(url: str, prompts: list[list[int]], output_len: int, concurrency: int,
                   request_rate: float) -> tuple[list[Result], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256)) as client:
        await one_request(client, url, prompts[0], 4)  # warm-up (allocations, first-call overheads)

        async def gated(p: list[int]) -> Result:
            async with sem:
                return await one_request(client, url, p, output_len)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(gated(p)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    toks = sum(r.tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [x for r in ok for x in r.itl]
    s = dict(name=name, requests=len(ok), errors=len(results) - len(ok), wall_s=wall, req_per_s=len(ok) / wall,
             out_tok_per_s=toks / wall, ttft_p50_ms=1e3 * pct([r.ttft for r in ok], 50),
             ttft_p99_ms=1e3 * pct([r.ttft for r in ok], 99), itl_p50_ms=1e3 * pct(itl, 50),
             itl_p99_ms=1e3 * pct(itl, 99), tpot_p50_ms=1e3 * pct(tpot, 50), tpot_p99_ms=1e3 * pct(tpot, 99),
             ttft_mean_ms=1e3 * statistics.fmean([r.ttft for r in ok]) if ok else float("nan"))
    if len(ok) < len(results):
        s["first_error"] = next(r.error for r in results if r.error)
    return s


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    cols = ["requests", "errors", "req_per_s", "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
    print(f"{'server':<38}" + "".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(f"{r['name']:<38}" + "".join(f"{r[c]:>14.2f}" if isinstance(r[c], float) else f"{r[c]:>14}"
                                            for c in cols))
        if "first_error" in r:
            print(f"    first error: {r['first_error']}")


def measure(server: Server, prompts, args, output_len: int) -> dict:
    try:
        server.wait_ready()
        results, wall = asyncio.run(run_load(server.url, prompts, output_len, args.concurrency, args.request_rate))
    finally:
        server.stop()
    return summarize(server.name, results, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the tiny preset, random weights)")
    ap.add_argument("--concurrency", "-c", type=int, default=16)
    ap.add_argument("--num-requests", "-n", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    ap.add_argument("--prefix-len", type=int, default=512, help="shared system prompt for the prefix-cache run")
    ap.add_argument("--prefix-requests", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-prefix", action="store_true")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve_baseline:
        return serve_baseline(args.model, args.port, args.threads)

    tmp = tempfile.TemporaryDirectory(prefix="lmstack_bench_serve_")
    model = Path(args.model) if args.model else build_tiny(Path(tmp.name), max_len=1024)
    cfg = json.loads((model / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    rng = random.Random(1)
    low = 16  # stay clear of the special tokens at the bottom of lmstack's BPE vocabularies
    prompts = [[rng.randrange(low, vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    print(f"model {model} ({cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, vocab {vocab}); "
          f"{args.num_requests} requests, prompt {args.prompt_len} tokens, output {args.output_len} tokens, "
          f"concurrency {args.concurrency}, rate {args.request_rate}/s, torch threads {args.threads}")

    figures: dict = {}
    rows = [measure(lmstack_server(model, args), prompts, args, args.output_len)]
    if not args.skip_baseline:
        rows.append(measure(baseline_server(model, args), prompts, args, args.output_len))
    print_table("throughput", rows)
    figures["throughput"] = rows
    if len(rows) == 2:
        ratio = rows[0]["out_tok_per_s"] / rows[1]["out_tok_per_s"]
        figures["output_tokens_per_s_ratio"] = ratio
        print(f"\nlmstack / baseline output tokens/s: {ratio:.2f}x  (target >= 4x at concurrency 16)")

    if not args.skip_prefix:
        shared = [rng.randrange(low, vocab) for _ in range(args.prefix_len)]
        pprompts = [shared + [rng.randrange(low, vocab) for _ in range(32)] for _ in range(args.prefix_requests)]
        out_len = 16
        prow = [measure(lmstack_server(model, args, True), pprompts, args, out_len),
                measure(lmstack_server(model, args, False), pprompts, args, out_len)]
        if not args.skip_baseline:
            prow.append(measure(baseline_server(model, args), pprompts, args, out_len))
        print_table(f"shared {args.prefix_len}-token system prompt + 32 unique tokens, output {out_len}", prow)
        gain = prow[1]["ttft_p50_ms"] / prow[0]["ttft_p50_ms"]
        figures["prefix"] = prow
        figures["prefix_cache_ttft_p50_gain"] = gain
        print(f"\nprefix caching: TTFT p50 {prow[1]['ttft_p50_ms']:.1f} ms -> {prow[0]['ttft_p50_ms']:.1f} ms "
              f"({gain:.2f}x lower)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
