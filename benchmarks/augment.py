"""Does augmentation help? The shipped EN+ZH support-intent classifier trained with and without
``lmstack data augment`` (EDA with protected spans) at an equal number of optimizer steps, held-out accuracy and
macro-F1 on the test split, over several seeds.

    python benchmarks/augment.py                    # 3 seeds, 240 steps each
    python benchmarks/augment.py --seeds 1 --steps 120

Baseline: the same trainer (``lmstack.model.classify.train_classifier``) on the 120 original training records;
augmented: the originals plus the filtered EDA copies (n_aug=4, alpha=0.1). Both runs use the same seed, the same
tokenizer settings and ``max_steps`` (so the augmented model does not simply train longer). Prints per seed and
the mean of both, the difference and the ratio, plus how many candidates the dedup and quality filters rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.data.augment import AugmentConfig, augment_records  # noqa: E402
from lmstack.model.classify import SHIPPED_INTENTS, ClassifyConfig, read_labelled, train_classifier  # noqa: E402
from lmstack.utils.io import write_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--n-aug", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = read_labelled(SHIPPED_INTENTS)
    train = [r for r in rows if r.get("split") != "test"]
    test = [r for r in rows if r.get("split") == "test"]
    res = {"baseline": [], "augmented": []}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_jsonl(t / "test.jsonl", test)
        for seed in range(a.seeds):
            aug, rep = augment_records(train, AugmentConfig(n_aug=a.n_aug, alpha=a.alpha, seed=seed))
            print(f"seed {seed}: augment {json.dumps(rep)}", flush=True)
            write_jsonl(t / "base.jsonl", train)
            write_jsonl(t / "aug.jsonl", train + aug)
            for name, data in (("baseline", "base.jsonl"), ("augmented", "aug.jsonl")):
                t0 = time.perf_counter()
                m = train_classifier(ClassifyConfig(data=str(t / data), eval_data=str(t / "test.jsonl"),
                                                    out=str(t / name), seed=seed, epochs=10_000,
                                                    max_steps=a.steps))
                res[name].append(m)
                print(f"seed {seed} {name:9s}: records {m['train_records']:4d} steps {m['steps']} "
                      f"acc {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in ("accuracy", "macro_f1", "accuracy_en", "accuracy_zh")}
            for k, v in res.items()}
    for m in ("accuracy", "macro_f1", "accuracy_en", "accuracy_zh"):
        b, g = mean["baseline"][m], mean["augmented"][m]
        print(f"mean {m:12s}: baseline {b:.3f}  augmented {g:.3f}  diff {g - b:+.3f}  ratio {g / max(b, 1e-9):.2f}")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
