"""Throughput of the data pipeline: documents/s and MB/s per step and end to end, and near dedup against a plain
``datasketch`` MinHashLSH loop on the same corpus and threshold.

    python benchmarks/data.py                 # generated 100 MB EN+ZH corpus, 2 processes
    python benchmarks/data.py --mb 10         # quicker

Corpus: documents assembled from shuffled sentences of the EN/ZH test fixtures with random word/character
substitutions (so they pass the quality filters and are mostly distinct), plus ~8% planted near-duplicates,
~4% exact duplicates and some PII. Per-step figures are single-process on a sample (``--step-mb``);
end to end is ``run_pipeline`` with ``--workers`` processes over the whole corpus.

Named baseline (near dedup): for each document ``datasketch.MinHash(num_perm=128).update_batch(shingles)``,
``lsh.query`` and ``lsh.insert`` when no candidate -- the usual datasketch loop -- vs lmstack's signatures
(same shingles) + one banded LSH pass with Jaccard verification, both single-process on the same documents.
Prints both times, the ratio, and how far the two agree on which documents are duplicates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "data_fixtures"


def _sentences():
    en, zh = [], []
    for d in (FIX / "good_en.txt").read_text(encoding="utf-8").split("=====\n"):
        en += [s.strip() + "." for s in d.strip().split(". ") if s.strip()]
    for d in (FIX / "good_zh.txt").read_text(encoding="utf-8").split("=====\n"):
        zh += [s.strip() + "。" for s in d.strip().split("。") if s.strip()]
    return en, zh


def make_corpus(path: Path, mb: float, seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    en, zh = _sentences()
    en_words = sorted({w for s in en for w in s.split()})
    zh_chars = sorted({c for s in zh for c in s if "\u4e00" <= c <= "\u9fff"})
    target, size, n = int(mb * 1e6), 0, 0
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            r = rng.random()
            if r < 0.04 and recent:
                text = rng.choice(recent)                        # exact duplicate
            elif r < 0.12 and recent:
                base = rng.choice(recent)                        # near duplicate: a few substitutions
                if base.isascii():
                    w = base.split(" ")
                    for _ in range(max(1, len(w) // 100)):
                        w[rng.randrange(len(w))] = rng.choice(en_words)
                    text = " ".join(w)
                else:
                    c = list(base)
                    for _ in range(max(1, len(c) // 200)):
                        c[rng.randrange(len(c))] = rng.choice(zh_chars)
                    text = "".join(c)
            elif r < 0.72:
                sents = rng.sample(en, rng.randint(8, min(30, len(en))))
                w = " ".join(sents).split(" ")
                for _ in range(len(w) // 3):
                    w[rng.randrange(len(w))] = rng.choice(en_words)
                text = " ".join(w)
                if rng.random() < 0.05:
                    text += f" Contact {rng.randint(100, 999)}@example.com or +1 (415) 555-{rng.randint(1000, 9999)}."
            else:
                sents = rng.sample(zh, rng.randint(8, min(30, len(zh))))
                c = list("".join(sents))
                for _ in range(len(c) // 3):
                    k = rng.randrange(len(c))
                    if "\u4e00" <= c[k] <= "\u9fff":
                        c[k] = rng.choice(zh_chars)
                text = "".join(c)
                if rng.random() < 0.05:
                    text += f"电话13{rng.randint(100000000, 999999999)}。"
            recent.append(text)
            if len(recent) > 200:
                recent.pop(rng.randrange(len(recent)))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            n += 1
    return n, size


def _rate(n_docs, n_bytes, secs):
    return f"{n_docs / secs:10.0f} docs/s {n_bytes / 1e6 / secs:8.2f} MB/s ({secs:.2f} s)"


def bench_steps(docs: list[str]) -> None:
    from lmstack.data.minhash import permutations, shingles, signature
    from lmstack.text.lang import detect_language
    from lmstack.text.normalize import normalize_text
    from lmstack.text.pii import redact
    from lmstack.text.quality import QualityConfig, quality_check

    nbytes = sum(len(d.encode()) for d in docs)
    qc = QualityConfig()
    a, b = permutations(128, 1)
    steps = {
        "normalize": lambda d: normalize_text(d),
        "language": detect_language,
        "quality": lambda d: quality_check(d, qc),
        "pii": redact,
        "minhash": lambda d: signature(shingles(d), a, b),
    }
    print(f"per step, 1 process, {len(docs):,} docs / {nbytes / 1e6:.1f} MB:")
    for name, fn in steps.items():
        t = time.perf_counter()
        for d in docs:
            fn(d)
        print(f"  {name:10s} {_rate(len(docs), nbytes, time.perf_counter() - t)}")


def bench_near_dedup(docs: list[str], threshold: float = 0.8) -> None:
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from lmstack.data.minhash import near_duplicates, permutations, shingles, signature

    sh = [shingles(d) for d in docs]  # same shingles for both
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    theirs = np.zeros(len(docs), dtype=bool)
    for i, s in enumerate(sh):
        m = MinHash(num_perm=128, seed=1, scheme="legacy")
        m.update_batch(s)
        if lsh.query(m):
            theirs[i] = True
        else:
            lsh.insert(i, m)
    t_ds = time.perf_counter() - t
    t = time.perf_counter()
    a, b = permutations(128, 1)
    sigs = np.stack([signature(s, a, b) for s in sh])
    t_sig = time.perf_counter() - t
    ours, _ = near_duplicates(sigs, threshold)
    t_ours = time.perf_counter() - t
    print(f"near dedup, 1 process, {len(docs):,} docs, threshold {threshold}, 128 perms (shingling excluded):")
    print(f"  datasketch MinHash+MinHashLSH loop: {t_ds:8.2f} s  ({len(docs) / t_ds:8.0f} docs/s), "
          f"{theirs.sum():,} duplicates")
    print(f"  lmstack signatures + banded LSH:    {t_ours:8.2f} s  ({len(docs) / t_ours:8.0f} docs/s), "
          f"{ours.sum():,} duplicates  [signatures {t_sig:.2f} s, LSH pass {t_ours - t_sig:.2f} s]")
    t = time.perf_counter()
    from lmstack.data.minhash import text_signature

    fast = np.stack([text_signature(d, a, b) for d in docs])
    fast_dup, _ = near_duplicates(fast, threshold)
    t_fast = time.perf_counter() - t
    print(f"  lmstack pipeline path (vectorized shingle hashing from raw text + LSH): {t_fast:.2f} s "
          f"({len(docs) / t_fast:.0f} docs/s), {fast_dup.sum():,} duplicates")
    print(f"  speed ratio lmstack/datasketch: {t_ds / t_ours:.2f}x; agreement on duplicate flags: "
          f"{(ours == theirs).mean() * 100:.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--step-mb", type=float, default=5.0)
    ap.add_argument("--dedup-mb", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end run (reuses --dir/corpus.jsonl)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    from lmstack.data.pipeline import run_pipeline

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="lmstack-bench-data-"))
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = tmp / "corpus.jsonl"
    if args.e2e_only and corpus.is_file():
        n, size = sum(1 for _ in open(corpus, encoding="utf-8")), corpus.stat().st_size
    else:
        t = time.perf_counter()
        n, size = make_corpus(corpus, args.mb)
        print(f"corpus: {n:,} docs, {size / 1e6:.1f} MB ({time.perf_counter() - t:.1f} s to generate) at {corpus}")
    if not args.e2e_only:
        _steps_and_dedup(corpus, args)

    cfg = {"inputs": [{"path": str(corpus)}], "workers": args.workers}
    t = time.perf_counter()
    rep = run_pipeline(cfg, tmp / "out")
    secs = time.perf_counter() - t
    print(f"end to end ({args.workers} processes, all steps): {_rate(n, size, secs)}; "
          f"{rep['documents']:,} docs out")
    for s in rep["steps"]:
        print(f"  {s['name']:12s} in {s['docs_in']:9,d} out {s['docs_out']:9,d}  removed {dict(s['removed'])}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: main {peak:.0f} MB, largest worker {child:.0f} MB; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")


def _steps_and_dedup(corpus: Path, args) -> None:
    docs = [json.loads(x)["text"] for x in open(corpus, encoding="utf-8")]
    step_docs, acc = [], 0
    for d in docs:
        step_docs.append(d)
        acc += len(d.encode())
        if acc >= args.step_mb * 1e6:
            break
    bench_steps(step_docs)
    dd, acc = [], 0
    for d in docs:
        dd.append(d)
        acc += len(d.encode())
        if acc >= args.dedup_mb * 1e6:
            break
    del docs
    bench_near_dedup(dd)
    del dd


if __name__ == "__main__":
    sys.exit(main())
