"""SFT batches grouped by length (``finetune.data.group_by_length``) vs random batches: padding and step time.

    python benchmarks/group_by_length.py                          # seeded lengths, 34-640 tokens
    python benchmarks/group_by_length.py --run runs/quickstart    # the quickstart's own grounded chats

Both modes take the same examples ``--batch`` at a time from ``lmstack.tune.batches.SFTBatches`` (same seed) and
run ``--steps`` steps of forward + loss + backward on a small random Llama (Hugging Face ``transformers``, 2
threads). Named baseline: random batches -- lmstack's default and Hugging Face Trainer's without
``group_by_length``. Printed: the share of padding tokens, seconds per step and real (non-padding) tokens/s for
each, and the grouped / random ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def lengths_from(run: str | None, n: int, seed: int) -> list[int]:
    if run is None:
        rng = random.Random(seed)
        return [int(34 * (640 / 34) ** rng.random()) for _ in range(n)]
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(os.path.join(run, "base", "model"))
    out = []
    with open(os.path.join(run, "rag", "sft_train.jsonl"), encoding="utf-8") as f:
        for line in f:
            k = len(tok.encode(tok.apply_chat_template(json.loads(line)["messages"])))
            if k <= 640:
                out.append(k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="a quickstart run directory (its rag/sft_train.jsonl lengths)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmstack.tune.batches import SFTBatches
    from lmstack.tune.data import Example

    lens = lengths_from(a.run, 1500, 0)
    ex = [Example([5] * n, [1] * n) for n in lens]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
    res = {}
    for mode in ("random", "grouped"):
        batches = SFTBatches(ex, a.batch, pad_id=0, seed=0, group_by_length=mode == "grouped")
        real = padded = 0
        t = time.perf_counter()
        for _ in range(a.steps):
            b = next(batches)
            real += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        res[mode] = (1 - real / padded, dt / a.steps, real / dt)
        print(f"{mode:8s} padding {res[mode][0]:.1%}  {res[mode][1]:.3f} s/step  {res[mode][2]:.0f} real tokens/s")
    print(f"grouped / random: s/step x{res['grouped'][1] / res['random'][1]:.2f}, "
          f"real tokens/s x{res['grouped'][2] / res['random'][2]:.2f} "
          f"({len(ex)} examples, {a.steps} steps of {a.batch}, {a.threads} threads, load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
