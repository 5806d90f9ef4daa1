"""Mixture of experts: lmstack's sorted expert dispatch vs a per-token loop, and an MoE model vs a dense model of
equal active parameters (training tokens/s and loss after N steps on the same data), in one run.

    dispatch   lmstack.model.moe.dispatch (sort slots by expert, one matmul group per expert, index_add_)
               vs dispatch_loop (for each token, for each of its k experts) and vs transformers 5's
               MixtralExperts (its loop over hit experts with torch.where per expert), same weights, same routing.
    training   the `moe` preset (Mixtral layout, 8 experts top-2, expert width 512) vs the same model dense
               with intermediate 1024 (= the active FFN width: 2 x 512), same attention, same data (a fixed
               random bigram source), AdamW 1e-3, fp32; tokens/s is the median over timed steps.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/moe.py [--threads 2] [--steps 30] [--tokens 512] [--data-vocab 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_dispatch(n_tokens: int, reps: int) -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from lmstack.model import preset
    from lmstack.model.moe import SparseMoE, dispatch, dispatch_loop, route

    cfg = preset("moe")
    torch.manual_seed(0)
    block = SparseMoE(cfg).eval()
    x = torch.randn(n_tokens, cfg.hidden_size)
    with torch.no_grad():
        w, idx = route(block.gate(x), cfg.num_experts_per_tok, True)
        hf = MixtralExperts(MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_intermediate_size,
                                          num_local_experts=cfg.num_experts))
        hf.gate_up_proj.copy_(torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in block.experts]))
        hf.down_proj.copy_(torch.stack([e.w2.weight for e in block.experts]))
        a = dispatch(x, w, idx, block.experts)
        assert torch.allclose(a, hf(x, idx, w), atol=1e-5), "dispatch differs from transformers"
        t_sorted = _time(lambda: dispatch(x, w, idx, block.experts), reps)
        t_hf = _time(lambda: hf(x, idx, w), reps)
        t_loop = _time(lambda: dispatch_loop(x, w, idx, block.experts), max(1, reps // 5))
    print(f"dispatch, {n_tokens} tokens, {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, "
          f"hidden {cfg.hidden_size}, expert width {cfg.moe_intermediate_size}:")
    print(f"  lmstack sorted   {t_sorted * 1e3:8.2f} ms")
    print(f"  transformers     {t_hf * 1e3:8.2f} ms   (lmstack {t_hf / t_sorted:.2f}x)")
    print(f"  per-token loop   {t_loop * 1e3:8.2f} ms   (lmstack {t_loop / t_sorted:.1f}x)")


def bigram_batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 0):
    """A fixed random bigram source over ``vocab`` tokens (each has 4 likely successors): learnable within a few
    dozen steps, identical for both models."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(vocab, (batch,), generator=g)
        for t in range(seq):
            ids[:, t + 1] = succ[ids[:, t], torch.randint(4, (batch,), generator=g)]
        out.append(ids)
    return out


def bench_training(steps: int, batch: int, seq: int, data_vocab: int) -> None:
    """Both models step in alternation (dense, moe, dense, ...), so both see the same machine load."""
    from lmstack.model import build_model, preset
    from lmstack.model.moe import expert_utilization

    moe_cfg = preset("moe")
    dense_cfg = moe_cfg.replace(model_type="llama", num_experts=0, intermediate_size=2 * moe_cfg.intermediate_size,
                                moe_intermediate_size=None)
    data = bigram_batches(data_vocab, batch, seq, steps)
    runs = {}
    for name, cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
        m = build_model(cfg, device="cpu", dtype="fp32", seed=0).train()
        runs[name] = dict(cfg=cfg, model=m, opt=torch.optim.AdamW(m.parameters(), lr=1e-3), times=[], loss=[])
    for i, ids in enumerate(data):
        for name, r in runs.items():
            m, opt = r["model"], r["opt"]
            t = time.perf_counter()
            lm = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            aux = m.router_losses().get("aux", 0.0)
            (lm + aux).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                r["times"].append(time.perf_counter() - t)
            r["loss"].append(lm.item())
    print(f"training, {steps} steps of {batch} x {seq} tokens (bigram data over {data_vocab} tokens; "
          f"floor ln 4 = 1.386), AdamW 1e-3, fp32, steps alternating between the models:")
    tps = {}
    for name, r in runs.items():
        cfg = r["cfg"]
        tps[name] = batch * seq / statistics.median(r["times"])
        last = statistics.mean(r["loss"][-5:])
        extra = ""
        if cfg.num_experts:
            u = expert_utilization(r["model"])
            extra = f"   expert share of slots (last step, min / max over layers x experts): {u.min():.3f} / {u.max():.3f}"
        print(f"  {name:5s} {cfg.num_parameters() / 1e6:5.1f}M params ({cfg.num_parameters(active_only=True) / 1e6:4.1f}M "
              f"active)  {tps[name]:8.0f} tok/s  loss first {r['loss'][0]:.3f} -> last-5 mean {last:.3f}{extra}")
    print(f"  moe / dense tokens/s: {tps['moe'] / tps['dense']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per dispatch call")
    ap.add_argument("--data-vocab", type=int, default=256, help="tokens the bigram source uses")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads")
    bench_dispatch(a.tokens, a.reps)
    bench_training(a.steps, a.batch, a.seq, a.data_vocab)


if __name__ == "__main__":
    main()
