"""Peak memory and tokens/s of full fine-tuning, LoRA and QLoRA (NF4, int8), with trainable-parameter shares.

    python benchmarks/finetune.py                      # CPU: small + qwen2.5-0.5b shapes, 2 threads
    python benchmarks/finetune.py --device cuda        # GPU: bf16 autocast, CUDA peak allocated memory
    python benchmarks/finetune.py --shapes small --steps 2

Each (shape, method) runs in its own subprocess so peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` over the training steps; on CPU the peak anonymous resident memory
(``RssAnon``, sampled every 2 ms) over the training steps, after setup garbage is freed. Both include the
weights, gradients, optimizer state and activations. Models have random weights (same shapes as the
presets); a step is forward + next-token loss + backward + AdamW over ``--batch`` x ``--seq`` random tokens.
lmstack methods use lmstack's SFT loss (``lmstack.tune.losses.sft_token_loss``: chunked logits); the
baseline uses transformers' own ``labels=`` loss.

Named baseline: Hugging Face ``transformers`` + ``peft`` LoRA (same shape, rank, targets, batch) in the same run.
Ratios printed: LoRA / full peak memory (target <= 0.5 on the 0.5B shape), QLoRA / LoRA peak memory
(target < 1), lmstack LoRA / peft LoRA tokens/s.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch

METHODS = ("full", "lora", "qlora-nf4", "qlora-int8", "peft-lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RssPeak:
    """Peak RssAnon (bytes) of this process, sampled by a thread."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every_s)

    def __enter__(self) -> "RssPeak":
        self.peak = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def build(shape: str, method: str, device: torch.device, r: int):
    """(model, trainable params, loss fn ids -> mean next-token CE) for one method."""
    from lmstack.model import build_model, preset

    cfg = preset(shape)
    if method == "peft-lora":
        import peft
        import transformers

        hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
        with torch.device(device):
            m = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        if device.type == "cuda":
            m = m.to(torch.bfloat16)
        m = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
        # transformers' own loss (labels=ids): what a transformers + peft user runs
        return m, [p for p in m.parameters() if p.requires_grad], lambda ids: m(input_ids=ids, labels=ids).loss
    from lmstack.quant import quantize_model
    from lmstack.tune.lora import LoraSpec, apply_lora

    frozen_dtype = torch.bfloat16 if (device.type == "cuda" and method != "full") else torch.float32
    model = build_model(cfg, device=device, dtype=torch.float32 if method.startswith("qlora") else frozen_dtype)
    if method.startswith("qlora"):
        quantize_model(model, method.split("-")[1], group_size=64)
        if device.type == "cuda":
            model.model.embed_tokens.to(torch.bfloat16)
            model.model.norm.to(torch.bfloat16)
            for layer in model.model.layers:
                layer.input_layernorm.to(torch.bfloat16)
                layer.post_attention_layernorm.to(torch.bfloat16)
    if method != "full":
        apply_lora(model, LoraSpec(r=r, alpha=2 * r, dropout=0.0, target_modules=TARGETS))
    from lmstack.tune.losses import sft_token_loss

    # lmstack's SFT loss: logits only for target positions, a chunk at a time
    return model, [p for p in model.parameters() if p.requires_grad], lambda ids: sft_token_loss(
        model, {"input_ids": ids, "labels": ids})[0]


def worker(shape: str, method: str, device_s: str, steps: int, batch: int, seq: int, r: int) -> dict:
    device = torch.device(device_s)
    torch.manual_seed(0)
    model, params, fwd = build(shape, method, device, r)
    model.train()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    from lmstack.quant import QuantLinear

    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with amp:
            loss = fwd(ids)  # mean next-token cross-entropy over the batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up; creates the optimizer state, which then counts in the steady peak
    _free()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with RssPeak() as rss:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss.peak
    return {"shape": shape, "method": method, "peak_bytes": peak, "tokens_per_s": steps * batch * seq / dt,
            "trainable": trainable, "total": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,qwen2.5-0.5b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        print("RESULT " + json.dumps(worker(*a.worker, a.device, a.steps, a.batch, a.seq, a.rank)))
        return
    print(f"device={a.device} threads={a.threads} batch={a.batch} seq={a.seq} steps={a.steps} rank={a.rank} "
          f"torch={torch.__version__}")
    results: list[dict] = []
    for shape in a.shapes.split(","):
        for method in a.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", shape, method, "--device", a.device, "--threads",
                   str(a.threads), "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
                   "--rank", str(a.rank)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{shape:>13} {method:<10} FAILED: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
                continue
            r = json.loads(line[7:])
            results.append(r)
            print(f"{shape:>13} {method:<10} peak {r['peak_bytes'] / 2**30:7.2f} GiB  "
                  f"{r['tokens_per_s']:9.1f} tok/s  trainable {r['trainable']:>11,} / {r['total']:>11,} "
                  f"({100 * r['trainable'] / r['total']:.3f}%)", flush=True)
    by = {(r["shape"], r["method"]): r for r in results}
    for shape in a.shapes.split(","):
        def ratio(x: str, y: str, key: str) -> str:
            if (shape, x) in by and (shape, y) in by:
                return f"{by[(shape, x)][key] / by[(shape, y)][key]:.3f}"
            return "n/a"
        print(f"{shape}: peak memory lora/full = {ratio('lora', 'full', 'peak_bytes')} (target <= 0.5), "
              f"qlora-nf4/lora = {ratio('qlora-nf4', 'lora', 'peak_bytes')}, "
              f"qlora-int8/lora = {ratio('qlora-int8', 'lora', 'peak_bytes')} (target < 1); "
              f"tokens/s lmstack lora / peft lora = {ratio('lora', 'peft-lora', 'tokens_per_s')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
