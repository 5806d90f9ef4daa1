"""lmstack on a GPU: the same code checked against transformers / peft on CUDA, then timed.

    PYTHONPATH=. python benchmarks/gpu.py --device cuda --out gpu_out        # on the GPU machine
    .venv/bin/python benchmarks/gpu.py --device cpu --quick --out /tmp/g     # smoke test of this script

1. Correctness, on tiny random Hugging Face models (llama, qwen2 with q/k/v bias and tied embeddings, qwen3
   with q/k norm, mistral with a sliding window shorter than the contexts) built with transformers and saved to
   a temporary directory, each loaded with ``lmstack.load(dir, device=..., dtype=...)``:
   - logits of lmstack's model vs transformers' on the same device: fp32 (atol 1e-4) and bf16 (lmstack's bf16
     error against the fp32 reference must be no worse than 1.5x transformers' bf16 error, plus a small slack);
   - the serving engine's greedy generation (fp32) for a batch of prompts of different lengths equals
     transformers' greedy ``generate`` of each prompt alone, with 16-token blocks and again with 4-token blocks,
     chunked prefill (8-token budget) and the prefix cache hit on a second pass; the chosen tokens' log-probs
     vs transformers' log-softmax;
   - bf16 engine vs transformers bf16 greedy: the share of tokens that agree (informational);
   - seeded sampling (temperature, top-k/p, repetition penalty, logprobs): one request gives the same tokens
     alone and inside a batch;
   - LoRA: lmstack's LoRA forward vs peft's on the same adapter file, then the engine with the adapter merged
     and unmerged vs peft's greedy ``generate``.
2. Decode speed: per-step times at steady state (``step_times``: lmstack ``LLMEngine.step()`` vs the gaps
   between transformers' generate steps, first pass and warm), then
   ``benchmarks/generate.py --device cuda --dtype bfloat16`` (lmstack engine vs transformers
   ``generate``, decode tokens/s excluding prefill) on the Qwen2.5-0.5B shape at batch 1, 8, 32, 64.
3. Training speed: ``benchmarks/train.py --device cuda`` (lmstack ``fit`` vs a plain transformers loop, bf16
   autocast) on a ~100M-parameter Llama, with MFU against a measured bf16 matmul peak.

Writes ``OUT/gpu.json`` (everything), ``OUT/profile.txt`` (torch.profiler tables), ``OUT/generate.json``, ``OUT/train.json`` and prints the tables.
Exit status 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")

import torch  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
WINDOW = 16  # mistral's sliding window: shorter than the longer prompts + outputs below
PROMPT_LENS = (37, 5, 19, 64, 1, 23)
NEW_TOKENS = 24


# ---------------------------------------------------------------------------------------------- models
def hf_config(arch: str, **kw):
    """tests/conftest.py's tiny config of ``arch``, larger: 3 layers, 128 wide (GQA 4/2 heads), 512 tokens."""
    from tests.conftest import tiny_hf_config

    per_arch = {"qwen3": {"head_dim": 48}, "mistral": {"sliding_window": WINDOW}}.get(arch, {})
    return tiny_hf_config(arch, **{"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
                                   "num_hidden_layers": 3, "max_position_embeddings": 512, "initializer_range": 0.2,
                                   **per_arch, **kw})


def make_hf_model(arch: str, path: Path, seed: int = 0):
    """Random transformers model saved under ``path`` (fp32). ``initializer_range=0.2`` gives peaked
    next-token distributions, so greedy comparisons are not decided by fp32 noise on near-ties; biases and
    norm weights are randomised so the qwen2 bias and the norms are exercised."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            if "norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return model


def hf_load(path: Path, device: torch.device, dtype: torch.dtype):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def prompts_of(lens, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).logits[0].float()


def engine_greedy(llm, prompts, n: int = NEW_TOKENS, **kw) -> list:
    """The engine's RequestOutputs for greedy, EOS-ignoring completions of ``prompts``."""
    return llm.generate(prompts, temperature=0, max_tokens=n, ignore_eos=True, use_tqdm=False, **kw)


# ---------------------------------------------------------------------------------------------- checks
class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool | None, **info) -> None:
        """ok None = informational."""
        row = {"check": name, "ok": ok, **info}
        self.rows.append(row)
        flag = "  info" if ok is None else ("  PASS" if ok else "**FAIL")
        extra = "  ".join(f"{k}={_short(v)}" for k, v in info.items())
        print(f"{flag}  {name:<46} {extra}", flush=True)

    def run(self, name: str, fn, *a, **kw) -> None:
        """Run a check function; an exception is a failed check with its traceback recorded."""
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - report and go on with the other checks
            tb = traceback.format_exc()
            print(tb, flush=True)
            self.add(name, False, error=f"{type(e).__name__}: {e}"[:300], traceback=tb[-3000:])

    @property
    def failed(self) -> int:
        return sum(r["ok"] is False for r in self.rows)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    s = str(v)
    return s if len(s) < 90 else s[:87] + "..."


def check_logits(C: Checks, arch: str, path: Path, dev: torch.device) -> None:
    import lmstack

    T = 40  # > the mistral window
    ids = prompts_of([T, T], 512, seed=1)
    x = torch.tensor(ids, device=dev)
    ref = {}
    for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = hf_load(path, dev, dt)
        llm = lmstack.load(path, device=dev, dtype=dt_name, max_num_seqs=8, kv_cache_memory=1 << 22)
        m = llm.model
        assert m.device.type == dev.type and m.dtype == dt, (m.device, m.dtype)
        with torch.inference_mode():
            ours = m(x).float()
            theirs = hf(input_ids=x).logits.float()
        ref[dt_name] = (ours, theirs)
        del hf, llm
    o32, h32 = ref["fp32"]
    d32 = (o32 - h32).abs().max().item()
    C.add(f"{arch} logits fp32 vs transformers", d32 <= 1e-4 + 1e-4 * h32.abs().max().item(),
          max_abs_diff=d32, logit_scale=h32.abs().max().item())
    o16, h16 = ref["bf16"]
    e_ours = (o16 - h32).abs().max().item()
    e_hf = (h16 - h32).abs().max().item()
    d16 = (o16 - h16).abs().max().item()
    top1 = (o16.argmax(-1) == h16.argmax(-1)).float().mean().item()
    slack = 0.02 * h32.abs().max().item()
    C.add(f"{arch} logits bf16 vs transformers bf16", e_ours <= 1.5 * e_hf + slack, lmstack_err_vs_fp32=e_ours,
          transformers_err_vs_fp32=e_hf, max_abs_diff=d16, top1_agree=top1)


def check_engine(C: Checks, arch: str, path: Path, dev: torch.device) -> None:
    import lmstack

    hf = hf_load(path, dev, torch.float32)
    prompts = prompts_of(PROMPT_LENS, 512, seed=2)
    want = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    for label, kw in (("16-token blocks", dict(block_size=16)),
                      ("4-token blocks, chunked prefill 8", dict(block_size=4, max_num_batched_tokens=8))):
        llm = lmstack.load(path, device=dev, dtype="fp32", max_num_seqs=8, kv_cache_memory=1 << 22, **kw)
        assert llm.engine.runner.k_pool[0].device.type == dev.type
        outs = [o.outputs[0] for o in engine_greedy(llm, prompts, logprobs=0)]
        got = [o.token_ids for o in outs]
        exact = sum(a == b for a, b in zip(got, want))
        C.add(f"{arch} engine greedy fp32 ({label})", exact == len(prompts), exact=f"{exact}/{len(prompts)}",
              kernel=llm.engine.kernel_reason)
        # the chosen tokens' log-probs vs transformers' log-softmax, teacher-forced on the same tokens
        worst = 0.0
        for p, o in zip(prompts, outs):
            lp = hf_logits(hf, p + o.token_ids[:-1])[len(p) - 1:].log_softmax(-1)
            ref = lp.gather(1, torch.tensor(o.token_ids, device=lp.device)[:, None])[:, 0].tolist()
            worst = max(worst, max(abs(a.logprob - b) for a, b in zip(o.logprobs, ref)))
        C.add(f"{arch} engine logprobs fp32 ({label})", worst <= 1e-3, max_abs_diff=worst)
        again = engine_greedy(llm, prompts)  # second pass: the prompts' full blocks hit the prefix cache
        cached = sum(o.metrics.num_cached_prompt_tokens for o in again)
        C.add(f"{arch} engine prefix-cache pass ({label})", [o.outputs[0].token_ids for o in again] == got
              and cached > 0, cached_prompt_tokens=cached)
        del llm
    # bf16: agreement with transformers bf16 (informational: bf16 rounding decides near-ties differently)
    hf16 = hf_load(path, dev, torch.bfloat16)
    llm = lmstack.load(path, device=dev, dtype="bf16", max_num_seqs=8, kv_cache_memory=1 << 22)
    got = [o.outputs[0].token_ids for o in engine_greedy(llm, prompts)]
    ref = [hf_greedy(hf16, p, NEW_TOKENS) for p in prompts]

    def first_diff(xs, ys):
        return [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), NEW_TOKENS) for x, y in zip(xs, ys)]

    first = first_diff(got, ref)
    C.add(f"{arch} engine greedy bf16 vs transformers bf16", None,
          tokens_before_first_divergence=first, exact=f"{sum(f == NEW_TOKENS for f in first)}/{len(prompts)}")
    # both bf16 runs against the fp32 greedy reference: how long each stays on it
    ours, theirs = first_diff(got, want), first_diff(ref, want)
    C.add(f"{arch} bf16 greedy: tokens matching fp32 greedy", None, lmstack=sum(ours), transformers=sum(theirs),
          of=NEW_TOKENS * len(prompts))


def check_sampling(C: Checks, path: Path, dev: torch.device) -> None:
    import lmstack

    llm = lmstack.load(path, device=dev, dtype="fp32", max_num_seqs=8, kv_cache_memory=1 << 22)
    prompts = prompts_of(PROMPT_LENS, 512, seed=3)
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1, presence_penalty=0.2,
              frequency_penalty=0.1, max_tokens=20, ignore_eos=True, logprobs=3, use_tqdm=False)
    alone = llm.generate([prompts[0]], seed=7, **kw)[0].outputs[0]
    batch = llm.generate(prompts, seed=7, **kw)[0].outputs[0]
    n2 = llm.generate([prompts[0]], seed=7, n=2, **kw)[0].outputs
    ok = alone.token_ids == batch.token_ids == n2[0].token_ids and len(alone.logprobs[0].top) == 3
    C.add("seeded sampling: same tokens alone / in a batch / n=2", ok, tokens=len(alone.token_ids),
          n2_differs=n2[1].token_ids != n2[0].token_ids)


def check_defaults(C: Checks, path: Path, dev: torch.device) -> None:
    """``lmstack.load(dir, device=dev)`` with every other default: the dtype picked for the device (bf16 on a
    CUDA GPU, fp32 on CPU), the KV pool sized from free memory, and a generation through it."""
    import lmstack

    llm = lmstack.load(path, device=dev)
    r = llm.engine.runner
    out = llm.generate([[5, 6, 7]], temperature=0, max_tokens=4, ignore_eos=True, use_tqdm=False)[0].outputs[0]
    want = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    C.add("lmstack.load defaults on the device", llm.model.dtype == want and r.k_pool[0].device.type == dev.type
          and len(out.token_ids) == 4, dtype=str(llm.model.dtype), kv_blocks=r.num_blocks,
          kv_gib=r.num_blocks * r.kv_bytes_per_block(llm.model, r.block_size) / 2**30)


def check_lora(C: Checks, arch: str, path: Path, dev: torch.device, tmp: Path) -> None:
    import peft

    import lmstack
    from lmstack.model import load_model
    from lmstack.tune.adapters import save_lora_adapter
    from lmstack.tune.lora import LoraSpec, apply_lora

    model = load_model(path, device=dev, dtype="fp32")
    spec = LoraSpec(r=8, alpha=16, target_modules="all-linear")
    apply_lora(model, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = tmp / f"lora_{arch}"
    save_lora_adapter(model, adapter, spec)
    pm = peft.PeftModel.from_pretrained(hf_load(path, dev, torch.float32), adapter).eval()
    x = torch.tensor(prompts_of([40, 40], 512, seed=4), device=dev)
    with torch.inference_mode():
        ours = model(x)
        ref = pm(input_ids=x).logits
        base = pm.get_base_model()
        with pm.disable_adapter():
            plain = base(input_ids=x).logits
    d = (ours - ref).abs().max().item()
    moved = (ref - plain).abs().max().item()
    C.add(f"{arch} LoRA forward fp32 vs peft", d <= 1e-4 + 1e-4 * ref.abs().max().item() and moved > 1e-2,
          max_abs_diff=d, adapter_effect=moved)
    # training-mode forward + backward on the GPU: the LoRA gradients exist and are finite
    model.train()
    loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    C.add(f"{arch} LoRA backward on {dev.type}", all(gr is not None and torch.isfinite(gr).all() for gr in grads),
          lora_tensors=len(grads))
    prompts = prompts_of(PROMPT_LENS[:4], 512, seed=5)
    want = []
    for p in prompts:
        ids = torch.tensor([p], device=dev)
        with torch.inference_mode():
            out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    for merge in (True, False):
        llm = lmstack.load(path, adapter=adapter, device=dev, dtype="fp32", merge_lora=merge, max_num_seqs=8,
                           kv_cache_memory=1 << 22)
        got = [o.outputs[0].token_ids for o in engine_greedy(llm, prompts)]
        exact = sum(a == b for a, b in zip(got, want))
        C.add(f"{arch} LoRA engine greedy vs peft ({'merged' if merge else 'unmerged'})", exact == len(prompts),
              exact=f"{exact}/{len(prompts)}")


def check_prefix(C: Checks, arch: str, method: str, path: Path, dev: torch.device, tmp: Path) -> None:
    """Prompt / prefix tuning: the adapter is made on the CPU, loaded on ``dev`` (prompt tuning runs its virtual
    tokens through the model there); the engine's greedy tokens must be peft's argmax, teacher-forced."""
    import peft

    import lmstack
    from lmstack.model import load_model
    from lmstack.tune.adapters import save_prompt_adapter
    from lmstack.tune.prompt import PromptEncoder, PromptSpec

    base = load_model(path, device="cpu", dtype="fp32")
    P = 5
    enc = PromptEncoder(base, method, PromptSpec(num_virtual_tokens=P), seed=2)
    with torch.no_grad():
        enc.prompt_embeddings.add_(torch.randn(enc.prompt_embeddings.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    adapter = tmp / f"{method}_{arch}"
    save_prompt_adapter(enc, base, adapter)
    pm = peft.PeftModel.from_pretrained(hf_load(path, dev, torch.float32), adapter).eval()
    llm = lmstack.load(path, adapter=adapter, device=dev, dtype="fp32", max_num_seqs=8, kv_cache_memory=1 << 22)
    prompts = prompts_of(PROMPT_LENS[:4], 512, seed=6)
    outs = [o.outputs[0] for o in engine_greedy(llm, prompts, logprobs=0)]
    exact, worst = 0, 0.0
    for p, o in zip(prompts, outs):
        with torch.inference_mode():
            lg = pm(input_ids=torch.tensor([p + o.token_ids[:-1]], device=dev)).logits[0].float()
        lg = (lg[P:] if method == "prompt" else lg)[len(p) - 1:]  # peft returns the virtual tokens' logits too
        exact += lg.argmax(-1).tolist() == o.token_ids
        ref = lg.log_softmax(-1).gather(1, torch.tensor(o.token_ids, device=dev)[:, None])[:, 0].tolist()
        worst = max(worst, max(abs(a.logprob - b) for a, b in zip(o.logprobs, ref)))
    C.add(f"{arch} {method} tuning engine vs peft (teacher-forced)", exact == len(prompts) and worst <= 1e-3,
          exact=f"{exact}/{len(prompts)}", logprob_max_abs_diff=worst)


def correctness(dev: torch.device, archs) -> Checks:
    C = Checks()
    with tempfile.TemporaryDirectory(prefix="lmstack_gpu_") as d:
        tmp = Path(d)
        for arch in archs:
            path = tmp / arch
            make_hf_model(arch, path)
            C.run(f"{arch} logits", check_logits, C, arch, path, dev)
            C.run(f"{arch} engine", check_engine, C, arch, path, dev)
        C.run("sampling", check_sampling, C, tmp / archs[0], dev)
        C.run("defaults", check_defaults, C, tmp / archs[0], dev)
        for arch in [a for a in ("qwen2", "llama") if a in archs]:
            C.run(f"{arch} lora", check_lora, C, arch, tmp / arch, dev, tmp)
        for arch in [a for a in ("qwen2", "mistral") if a in archs]:  # mistral: the window ages out the prefix
            for method in ("prompt", "prefix"):
                C.run(f"{arch} {method}", check_prefix, C, arch, method, tmp / arch, dev, tmp)
    return C


# ---------------------------------------------------------------------------------------------- speed
def step_times(dev: torch.device, name: str, batches: list[int], new: int = 128, prompt_len: int = 32,
               backends: tuple[str, ...] = ("default",)) -> list[dict]:
    """Per-step decode wall time, steady state: lmstack ``LLMEngine.step()`` (synchronised after each step)
    vs the gaps between transformers ``generate`` steps (a StoppingCriteria timestamps each one), median over
    the ~125 decode steps of one pass. Two passes per batch: the first meets every key length for the first
    time (cuDNN attention builds a plan per shape), the second is warm. ``backends``: "default" and/or
    "no-cudnn" (``torch.backends.cuda.enable_cudnn_sdp(False)`` for both sides)."""
    import statistics

    import transformers

    from lmstack.model import build_model, preset, save_model
    from lmstack.model.hf_io import load_model
    from lmstack.serve.llm import LLM
    from lmstack.serve.types import SamplingParams

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    class Rec(transformers.StoppingCriteria):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kw):
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def lm_pass(llm, prompts):
        eng = llm.engine
        for p in prompts:
            eng.add_request(p, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        ts, k = [], 0
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()
            sync()
            k += 1
            if k > 3:  # past the prefill
                ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def hf_pass(hf, prompts):
        ids = torch.tensor(prompts, device=dev)
        rec = Rec()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, eos_token_id=None, pad_token_id=0,
                        stopping_criteria=transformers.StoppingCriteriaList([rec]))
        return statistics.median(b - a for a, b in zip(rec.t[3:], rec.t[4:]))

    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = preset(name)
    with tempfile.TemporaryDirectory() as d:
        save_model(build_model(cfg, device="cpu", dtype="fp32", seed=0), d)
        ours = load_model(d, device=dev, dtype=dt)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt).to(dev).eval()
    kv = max(batches) * (prompt_len + new + 32) * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * \
        cfg.head_dim * dt.itemsize
    llm = LLM(ours, max_num_seqs=max(batches), max_model_len=prompt_len + new + 16, kv_cache_memory=kv)
    g = torch.Generator().manual_seed(0)
    rows = []
    for backend in backends:
        if dev.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(backend != "no-cudnn")
        for B in batches:
            prompts = torch.randint(3, cfg.vocab_size, (B, prompt_len), generator=g).tolist()
            for rep in ("first pass", "warm"):
                row = dict(preset=name, dtype=str(dt).removeprefix("torch."), sdpa=backend, batch=B, run=rep,
                           lmstack_ms=1e3 * lm_pass(llm, prompts), transformers_ms=1e3 * hf_pass(hf, prompts))
                row["ratio"] = row["transformers_ms"] / row["lmstack_ms"]
                rows.append(row)
                print(f"  [{backend}] batch {B:>2} {rep:<10} step lmstack {row['lmstack_ms']:6.2f} ms  transformers "
                      f"{row['transformers_ms']:6.2f} ms  -> lmstack {row['ratio']:.2f}x", flush=True)
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(True)
    return rows


def run_script(argv: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    print("$ " + " ".join(argv), flush=True)
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in p.stdout:
            print("  " + line, end="", flush=True)
            lines.append(line)
        p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t)))
    except subprocess.TimeoutExpired:
        p.kill()
    print(f"  ({time.perf_counter() - t:.0f} s, exit {p.returncode})", flush=True)
    return p.returncode, "".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench_out/gpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke test of this script)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["correctness", "steps", "generate", "train"])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--gen-batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--train-preset", default="100m")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-seq", type=int, default=1024)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    import peft
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "peft": peft.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "python": sys.version.split()[0]}
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    result: dict = {"env": env, "args": vars(a)}
    t0 = time.perf_counter()
    failed = 0
    if "correctness" not in a.skip:
        print("\n== correctness: lmstack vs transformers / peft on", dev, flush=True)
        C = correctness(dev, a.archs)
        result["checks"] = C.rows
        failed = C.failed
        print(f"correctness: {len(C.rows) - failed} of {len(C.rows)} checks pass or are informational, "
              f"{failed} failed ({time.perf_counter() - t0:.0f} s)", flush=True)
        (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    if "steps" not in a.skip:
        print("\n== decode step times (median per step, steady state)", flush=True)
        result["steps"] = step_times(dev, "tiny" if a.quick else "qwen2.5-0.5b", [1, 2] if a.quick else [1, 8, 64],
                                     new=16 if a.quick else 128)
        (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    if "generate" not in a.skip:
        print("\n== decode speed: benchmarks/generate.py", flush=True)
        if a.quick:
            argv = ["benchmarks/generate.py", "--device", a.device, "--dtype", "bfloat16", "--presets", "tiny",
                    "--batches", "1", "2", "--new-tokens", "8", "--repeats", "1", "--rounds", "1"]
        else:
            argv = ["benchmarks/generate.py", "--device", a.device, "--dtype", "bfloat16", "--presets", "tiny",
                    "qwen2.5-0.5b", "--batches", *map(str, a.gen_batches), "--new-tokens", str(a.gen_tokens),
                    "--repeats", "2", "--rounds", "1"]
        rc, log = run_script(argv + ["--json", str(out / "generate.json"), "--profile", str(out / "profile.txt")],
                             timeout=240)
        result["generate_cmd"] = " ".join(argv)
        if (out / "generate.json").is_file():
            result["generate"] = json.loads((out / "generate.json").read_text())
        result["generate_rc"] = rc
        (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    if "train" not in a.skip:
        print("\n== training speed: benchmarks/train.py", flush=True)
        if a.quick:
            argv = ["benchmarks/train.py", "--device", a.device, "--presets", "tiny", "--steps", "3",
                    "--batch", "2", "--seq", "64", "--variants", "transformers,lmstack", "--rounds", "1"]
        else:
            argv = ["benchmarks/train.py", "--device", a.device, "--presets", a.train_preset, "--steps",
                    str(a.train_steps), "--batch", str(a.train_batch), "--seq", str(a.train_seq)] + \
                (["--rounds", "1"] if a.no_compile else ["--compile", "--rounds", "1"])
        rc, log = run_script(argv + ["--json", str(out / "train.json")], timeout=240)
        result["train_cmd"] = " ".join(argv)
        if (out / "train.json").is_file():
            result["train"] = json.loads((out / "train.json").read_text())
        result["train_rc"] = rc
    result["wall_s"] = time.perf_counter() - t0
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    summary(result)
    sys.exit(1 if failed else 0)


def summary(r: dict) -> None:
    print("\n== summary", r["env"])
    if "checks" in r:
        bad = [c["check"] for c in r["checks"] if c["ok"] is False]
        print(f"correctness: {sum(c['ok'] is True for c in r['checks'])} pass, {len(bad)} fail"
              + (": " + "; ".join(bad) if bad else ""))
    if "generate" in r:
        print("\n| preset | batch | lmstack tok/s | transformers tok/s | ratio | greedy agree (8 tokens) "
              "| first pass lmstack / transformers |")
        print("|---|---:|---:|---:|---:|---|---|")
        for row in r["generate"]["rows"]:
            cold = (f"{row['lmstack_cold']:,.0f} / {row['transformers_cold']:,.0f}" if "lmstack_cold" in row else "")
            print(f"| {row['preset']} {row['dtype']} | {row['batch']} | {row['lmstack']:,.0f} | "
                  f"{row['transformers']:,.0f} | {row['ratio']:.2f}x | {row['agree']} | {cold} |")
    if "steps" in r:
        print("\n| preset | batch | pass | lmstack ms/step | transformers ms/step | lmstack speed-up |")
        print("|---|---:|---|---:|---:|---:|")
        for row in r["steps"]:
            print(f"| {row['preset']} {row['dtype']} | {row['batch']} | {row['run']} | {row['lmstack_ms']:.2f} | "
                  f"{row['transformers_ms']:.2f} | {row['ratio']:.2f}x |")
    if "train" in r:
        print("\n| shape | variant | tok/s | MFU | peak MiB | vs transformers |")
        print("|---|---|---:|---:|---:|---:|")
        for row in r["train"]["rows"]:
            ratio = row.get("ratio_vs_transformers")
            print(f"| {row['preset']} ({row['params_M']:.0f}M) | {row['variant']} | {row['tokens_per_s']:,.0f} | "
                  f"{100 * row['mfu']:.1f}% | {row['peak_mem_mib']:,.0f} | "
                  f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    print(f"\nwall {r.get('wall_s', 0):.0f} s")


if __name__ == "__main__":
    main()
