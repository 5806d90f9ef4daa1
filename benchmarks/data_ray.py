"""The data pipeline on Ray Data vs the local executor: the same corpus and config, end to end
(read -> normalize / language / quality / PII -> exact + near dedup -> data.jsonl), 1 and 2 workers each.

    python benchmarks/data_ray.py               # 4 MB generated EN+ZH corpus in 4 files
    python benchmarks/data_ray.py --mb 20

Baseline: lmstack's local executor (a multiprocessing pool + one global dedup pass) with --workers 1 / 2.
Ray: ``lmstack data run --executor ray`` on a local Ray started with ``num_cpus`` 1 / 2 (start-up timed apart).
The corpus is benchmarks/data.py's (planted exact and near duplicates, PII). Every run's data.jsonl must be
byte-identical to the local one; the script says so or fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import make_corpus  # noqa: E402  (benchmarks/data.py)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=4.0)
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    import ray

    from lmstack.data.pipeline import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_docs, n_bytes = make_corpus(tmp / "all.jsonl", args.mb)
        lines = (tmp / "all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (tmp / "in").mkdir()
        for i in range(args.files):
            (tmp / "in" / f"part{i:02d}.jsonl").write_text("".join(lines[i::args.files]), encoding="utf-8")
        print(f"corpus: {n_docs:,} docs, {n_bytes / 1e6:.1f} MB in {args.files} files; load {os.getloadavg()}")
        rows, ref = [], None
        for executor, workers in (("local", 1), ("local", 2), ("ray", 1), ("ray", 2)):
            cfg = {"inputs": [{"path": str(tmp / "in" / "*.jsonl"), "name": "web"}], "workers": workers}
            start = 0.0
            if executor == "ray":
                t = time.perf_counter()
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                start = time.perf_counter() - t
            t = time.perf_counter()
            rep = run_pipeline(cfg, tmp / f"out-{executor}-{workers}", executor=executor)
            secs = time.perf_counter() - t
            if executor == "ray":
                ray.shutdown()
            digest = hashlib.sha256((tmp / f"out-{executor}-{workers}" / "data.jsonl").read_bytes()).hexdigest()
            ref = ref or digest
            assert digest == ref, f"{executor} x{workers}: data.jsonl differs from the local executor's"
            rows.append((executor, workers, secs, start, rep["documents"]))
        base = rows[1][2]
        print(f"{'executor':8} {'workers':>7} {'docs/s':>8} {'MB/s':>6} {'run s':>7} {'start s':>7} {'vs local x2':>11}")
        for executor, workers, secs, start, kept in rows:
            print(f"{executor:8} {workers:7d} {n_docs / secs:8.0f} {n_bytes / 1e6 / secs:6.2f} {secs:7.1f} "
                  f"{start:7.1f} {base / secs:10.2f}x")
        print(f"all four data.jsonl identical ({rows[0][4]:,} documents kept); load {os.getloadavg()}")


if __name__ == "__main__":
    main()
