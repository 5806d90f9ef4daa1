"""Encoder classifier throughput: sentences/s of lmstack's Encoder vs transformers' BertForSequenceClassification
on the same weights and the same token ids (the shipped EN+ZH intent texts), predictions checked equal.

The model is a classifier directory (``lmstack classify train`` output) or, without one, a random classifier of
all-MiniLM-L6-v2's shape (6 x 384, 12 heads) or of the default `lmstack classify` shape (2 x 128).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/encoder.py [--model DIR] [--shape minilm|small] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", default="minilm", choices=["minilm", "small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    from lmstack.model.classify import SHIPPED_INTENTS, read_labelled
    from lmstack.model.encoder import load_encoder

    texts = [r["text"] for r in read_labelled(SHIPPED_INTENTS)]
    tmp = tempfile.mkdtemp()
    path = a.model
    if path is None:
        shape = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536) \
            if a.shape == "minilm" else dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=256)
        cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=5, **shape)
        transformers.BertForSequenceClassification(cfg).save_pretrained(tmp)
        path = tmp
    hf = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    ours = load_encoder(path)
    g = torch.Generator().manual_seed(0)  # token ids: lengths of the real texts under a ~30k WordPiece vocab
    lengths = [min(2 + len(t.split()) + sum(ord(c) > 0x2E80 for c in t), 64) for t in texts]
    batches = []
    for i in range(0, len(texts), a.batch):
        ls = lengths[i:i + a.batch]
        ids = torch.randint(1000, hf.config.vocab_size, (len(ls), max(ls)), generator=g)
        mask = (torch.arange(max(ls))[None] < torch.tensor(ls)[:, None]).long()
        batches.append((ids * mask, mask))
    with torch.no_grad():
        for ids, mask in batches:
            assert torch.equal(ours(ids, mask).argmax(-1), hf(input_ids=ids, attention_mask=mask).logits.argmax(-1))

        def run_ours():
            for ids, mask in batches:
                ours(ids, mask)

        def run_hf():
            for ids, mask in batches:
                hf(input_ids=ids, attention_mask=mask)

        res = {}
        for name, fn in (("lmstack", run_ours), ("transformers", run_hf)):
            fn()
        for _ in range(a.reps):  # alternate rounds so both see the same machine load
            for name, fn in (("lmstack", run_ours), ("transformers", run_hf)):
                t = time.perf_counter()
                fn()
                res.setdefault(name, []).append(len(texts) / (time.perf_counter() - t))
    n = sum(p.numel() for p in hf.parameters())
    print(f"torch {torch.__version__}, {a.threads} threads; {len(texts)} sentences, batch {a.batch}, "
          f"{n / 1e6:.1f}M-parameter classifier ({path if a.model else a.shape})")
    for name, v in res.items():
        print(f"  {name:12s} {statistics.median(v):8.0f} sentences/s (median of {a.reps})")
    print(f"  lmstack / transformers: {statistics.median(res['lmstack']) / statistics.median(res['transformers']):.2f}x")


if __name__ == "__main__":
    main()
