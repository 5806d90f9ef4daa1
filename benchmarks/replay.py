"""Continued pretraining with and without replay: the catastrophic-forgetting trade-off in one table.

    python benchmarks/replay.py                  # a `micro` model pretrained here on general text (minutes on 2 cores)
    python benchmarks/replay.py --base DIR --lr 2e-4 --steps 40   # an existing model, e.g. SmolLM2-135M imported
                                                                  # with `lmstack import --gguf` (slow on a CPU)

The general model (default: lmstack's `micro` preset, 2k-token BPE, pretrained from scratch on Python's stdlib
docstrings, pydoc topics and code -- lmstack.data.stdlib_corpus) continues pretraining on a domain corpus (the
Larkspur Home shop pages, EN + ZH, recipes/data/shop) with recipes/continue-replay.yaml, once with replay share 0
(the named baseline: plain continued pretraining) and once with a share of each batch drawn from the general
text. Perplexity on held-out domain pages and held-out general documents (never trained on) before and after
each run, on the same windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def perplexity(model, arrays: list[np.ndarray], seq_len: int, max_windows: int) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of the held-out documents."""
    flat = np.concatenate(arrays)
    n = min((len(flat) - 1) // seq_len, max_windows)
    nll, count = 0.0, 0
    for k in range(0, n, 8):
        rows = [flat[(k + i) * seq_len:(k + i) * seq_len + seq_len + 1] for i in range(min(8, n - k))]
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        logits = model(x[:, :-1]).float()
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="HF model dir (default: pretrain a `micro` general model here)")
    ap.add_argument("--general-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/continue-replay")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--shares", default="0,0.25")
    ap.add_argument("--general-chars", type=int, default=800_000)
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    from lmstack.apps.support.kb import kb_documents, load_kb
    from lmstack.data.shards import write_shards
    from lmstack.data.stdlib_corpus import stdlib_corpus
    from lmstack.model import load_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.train import pretrain
    from lmstack.train.config import load_pretrain_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    general = [d["text"] for d in stdlib_corpus(args.general_chars)]
    domain = [d["text"] for d in kb_documents(load_kb())]
    gen_train, gen_held = [t for i, t in enumerate(general) if i % 25], general[::25]
    dom_train, dom_held = [t for i, t in enumerate(domain) if i % 5], domain[::5]
    t0 = time.perf_counter()
    if args.base:
        base = Path(args.base)
    else:  # a general model: BPE on the general text, `micro` pretrained on it
        base = out / "general-model" / "final"
        if not (base / "config.json").is_file():
            from lmstack.tokenizer import train_tokenizer
            from lmstack.train import PretrainConfig

            tok = train_tokenizer(gen_train, 2048, out_dir=out / "tok", show_progress=False)
            write_shards(gen_train, tok, out / "general", val_fraction=0.0, tokenizer_dir=str(out / "tok"))
            pretrain(PretrainConfig.model_validate({
                "run_dir": str(out / "general-model"), "model": {"preset": "micro"},
                "data": {"shards": str(out / "general"), "seq_len": 64, "batch_size": 8, "val_windows": 0},
                "train": {"steps": args.general_steps, "lr": 3e-3, "warmup_steps": 20, "log_every": 25,
                          "eval_every": 0, "ckpt_every": 0, "seed": 0, "tensorboard": False, "plot": False}}))
    general_s = time.perf_counter() - t0
    tok = Tokenizer.from_dir(base)
    for name, texts in (("domain", dom_train), ("general", gen_train)):
        if not (out / name / "index.json").is_file():
            write_shards(texts, tok, out / name, val_fraction=0.0, tokenizer_dir=str(base))

    def ids(texts):
        return [np.array(t + [tok.eos_token_id], np.int64) for t in tok.encode_batch(texts)]

    held = {"domain": ids(dom_held), "general": ids(gen_held)}
    recipe = load_pretrain_config(str(ROOT / "recipes" / "continue-replay.yaml"))
    T = recipe.data.seq_len
    print(f"domain: {len(dom_train)} train / {len(dom_held)} held-out pages; general: {len(gen_train)} / "
          f"{len(gen_held)} documents; held-out tokens domain {sum(map(len, held['domain'])):,} general "
          f"{sum(map(len, held['general'])):,}; load {os.getloadavg()}")

    def evaluate(model_dir) -> dict:
        m = load_model(model_dir, device="cpu", dtype="fp32").eval()
        return {k: perplexity(m, v, T, args.eval_windows) for k, v in held.items()}

    rows = [("before (general model)", None, evaluate(base), general_s)]
    print(rows[0])
    for share in [float(x) for x in args.shares.split(",")]:
        cfg = load_pretrain_config(str(ROOT / "recipes" / "continue-replay.yaml"), [
            f"model.from_dir={base}", f"data.shards={out / 'domain'}", f"data.replay={out / 'general'}",
            f"data.replay_share={share}", f"run_dir={out / f'share-{share:g}'}", f"train.steps={args.steps}",
            f"train.seed=0", f"train.lr={args.lr}", "data.batch_size=8"])
        t = time.perf_counter()
        res = pretrain(cfg)
        secs = time.perf_counter() - t
        rows.append((f"continued, replay {share:.0%}", share, evaluate(res.final_dir), secs))
        print(rows[-1])
    print(f"\n| model | domain ppl | general ppl | train s |\n|---|---:|---:|---:|")
    for name, _, ppl, secs in rows:
        print(f"| {name} | {ppl['domain']:.2f} | {ppl['general']:.2f} | {secs:.0f} |")
    print(f"load {os.getloadavg()}")
    (out / "table.json").write_text(json.dumps([{"model": n, "replay_share": s, **p, "train_s": secs}
                                                for n, s, p, secs in rows], indent=2))


if __name__ == "__main__":
    main()
