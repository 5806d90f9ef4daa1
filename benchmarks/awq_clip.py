"""AWQ's clipping search on real activations: held-out output error of SmolLM2-135M layers at int4 group 64 after
round-to-nearest, AWQ scaling, and AWQ scaling + clipping (lmstack.quant.awq), in one run, with the ratio.

    .venv/bin/python benchmarks/awq_clip.py --model-dir models/smollm2 --calib calibration.txt

Calibration: 4 windows of 256 tokens of --calib; held out: the next 2 windows. ``torch.set_num_threads(2)``.
(Group 32 is not measured on SmolLM2: its weights come from a Q4_1 GGUF, which group-32 int4 reproduces exactly.)
"""
import argparse
import os

import torch

from lmstack.model.hf_io import load_model
from lmstack.quant.awq import awq_scales_from_stats, clip_search, rtn_int4
from lmstack.quant.checkpoint import calibration_ids

NAMES = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj", "model.layers.15.mlp.gate_proj",
         "model.layers.15.mlp.down_proj", "model.layers.29.mlp.down_proj", "model.layers.15.self_attn.o_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"load average {os.getloadavg()}")
    ids = calibration_ids(args.model_dir, args.calib, seq_len=256, max_seqs=6)
    cal, held = ids[:4], ids[4:]
    m = load_model(args.model_dir)
    acts: dict[str, list] = {}

    def hook(n):
        def f(mod, inp, out):
            acts.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1]).float())
        return f

    for n in NAMES:
        m.get_submodule(n).register_forward_hook(hook(n))
    with torch.no_grad():
        m(cal)
        m(held)
    g = args.group_size
    for n in NAMES:
        xc, xh = acts[n]
        w = m.get_submodule(n).weight.detach().float()
        if n.endswith("gate_proj"):  # gate and up read the same input: one AWQ group
            w = torch.cat([w, m.get_submodule(n.replace("gate", "up")).weight.detach().float()])
        s, _, _ = awq_scales_from_stats(xc.abs().mean(0), xc.t() @ xc / len(xc), [w], g)
        ws = w * s
        mm = clip_search(ws, (xc / s).t() @ (xc / s) / len(xc), g)
        wc = torch.maximum(torch.minimum(ws.view(ws.shape[0], -1, g), mm[..., None]), -mm[..., None]).view_as(ws)
        ref = xh @ w.t()

        def err(wh):
            return float(((xh @ wh.t()) - ref).pow(2).mean())

        rtn, awq, awqc = err(rtn_int4(w, g)), err(rtn_int4(ws, g) / s), err(rtn_int4(wc, g) / s)
        print(f"{n:36s} g{g}: held-out output MSE  RTN {rtn:.3e}  AWQ {awq:.3e}  AWQ+clip {awqc:.3e}  "
              f"(clip / no clip {awqc / max(awq, 1e-30):.3f})", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
