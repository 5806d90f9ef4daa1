"""One forward pass of a mixed prefill/decode batch over the paged KV cache.

All scheduled tokens are packed into one row, ``input_ids (1, N)``, so every linear layer runs once on
N tokens with no padding. Decode tokens come first, then each prefill chunk. :class:`PagedAttention`
is the attention context the Transformer calls per layer (``ctx.attend(layer_idx, q, k, v)``):

1. write the step's k/v into their slots of the KV pool (``index_copy_``);
2. decodes: gather every decoding sequence's blocks into one padded batch
   ``(B_dec, n_kv, S_max, D)`` and run a single SDPA call with a padding (+ sliding-window) mask;
3. prefills: one SDPA call per chunk -- plain causal attention on the chunk itself when it starts at
   position 0, else over its gathered blocks with an offset causal mask.

On CUDA a step whose attention calls need no mask (a lone decode, prefills from position 0) runs SDPA with
the flash / memory-efficient kernels only (:func:`sdpa_backends`): PyTorch's default on Hopper is cuDNN
attention, which builds an execution plan the first time it meets each key length (~45 ms for the 0.5B
shape measured on an H100), i.e. at every new decode length and prompt length.

Prefix / prompt tuning (``prefix_kv``): each layer's (k, v) of shape (n_kv, P, D) is prepended to every
sequence's keys; real tokens take positions P, P+1, ... (the ``lmstack.tune.adapters`` contract). Reference: vLLM ``PagedAttention``; the
KV-pool layout (num_blocks, block_size, n_kv, D) follows nano-vllm.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.model.rope import rope_attention_factor
from lmstack.model.transformer import Transformer, rope_inv_freq
from lmstack.serve.scheduler import ScheduledSeq


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False) -> Tensor:
    """q (B, H, T, D); k, v (B, n_kv, S, D) with H a multiple of n_kv (grouped-query attention)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sdpa_backends(device: torch.device, masked: bool) -> list | None:
    """The SDPA kernels a step on ``device`` may use (None: PyTorch's own choice).

    Unmasked attention on CUDA skips cuDNN attention: it builds and caches an execution plan per shape, and
    a decode's key length (one more every step) and each prompt's length are new shapes, so the first pass
    over every length paid ~45 ms per step on an H100 (0.5B shape; 15.6 ms warm), and flash attention was
    also faster warm at batch 1 (11.5-12.6 vs 15.6 ms per step). Masked steps (batched decodes, chunked
    prefill) keep the default: their key lengths are padded to whole blocks, so a plan is built once per
    (batch, blocks) shape rather than per token, and warm cuDNN was the fastest there (12.5-13.3 vs
    15.4-17.6 ms per step at batch 8-64)."""
    if device.type != "cuda" or masked:
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class _Prefill:
    offset: int  # first packed index of the chunk
    num_tokens: int
    direct: bool  # chunk starts at position 0 and needs no mask beyond causal: attend to itself
    blocks: Tensor | None  # (nb,) block ids covering the context, when not direct
    mask: Tensor | None  # (1, 1, T, P + nb * block_size)


def _sdpa_kernel(backends: list):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


class PagedAttention:
    """The attention context for one engine step (built by :meth:`ModelRunner.prepare`)."""

    def __init__(self, runner: "ModelRunner", slots: Tensor, num_decode: int, dec_blocks: Tensor | None,
                 dec_mask: Tensor | None, prefills: list[_Prefill], dec_span: tuple[int, int] | None = None,
                 dec_slots: Tensor | None = None):
        self.r = runner
        self.dec_span = dec_span  # (first slot, last slot + 1): one decode whose visible keys are contiguous
        self.dec_slots = dec_slots  # (S,) slots of the visible keys of one decode whose blocks are scattered
        self.slots = slots  # (N,) slot of each packed token
        self.num_decode = num_decode
        self.dec_blocks = dec_blocks  # (B_dec, nb_max)
        self.dec_mask = dec_mask  # (B_dec, 1, 1, P + nb_max * block_size)
        self.prefills = prefills

    @property
    def masked(self) -> bool:
        """Whether any attention call of this step takes a mask (batched decodes, non-direct prefills)."""
        return self.dec_blocks is not None or any(not p.direct for p in self.prefills)

    def _gather(self, layer_idx: int, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """blocks (B, nb) -> k, v (B, n_kv, P + nb * bs, D), with the prefix in front."""
        r = self.r
        B, nb = blocks.shape
        flat = blocks.view(-1)  # index_select on dim 0 is a plain row copy, far cheaper than advanced indexing
        k = r.k_pool[layer_idx].index_select(0, flat).view(B, nb * r.block_size, r.n_kv, r.head_dim).transpose(1, 2)
        v = r.v_pool[layer_idx].index_select(0, flat).view(B, nb * r.block_size, r.n_kv, r.head_dim).transpose(1, 2)
        if r.prefix_kv is not None:
            pk, pv = r.prefix_kv[layer_idx]  # (n_kv, P, D)
            k = torch.cat([pk.expand(B, *pk.shape), k], 2)
            v = torch.cat([pv.expand(B, *pv.shape), v], 2)
        return k, v

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q (1, H, N, D); k, v (1, n_kv, N, D)
        r = self.r
        r.k_flat[layer_idx].index_copy_(0, self.slots, k[0].transpose(0, 1))  # (N, n_kv, D) into (slots, n_kv, D)
        r.v_flat[layer_idx].index_copy_(0, self.slots, v[0].transpose(0, 1))
        outs: list[Tensor] = []
        nd = self.num_decode
        if nd:
            qd = q[:, :, :nd].permute(2, 1, 0, 3)  # (B_dec, H, 1, D)
            if self.dec_span is not None:  # zero-copy: a slice of the pool, no mask needed
                a, b = self.dec_span
                kd = r.k_flat[layer_idx][a:b].transpose(0, 1)[None]  # (1, n_kv, S, D)
                vd = r.v_flat[layer_idx][a:b].transpose(0, 1)[None]
                outs.append(_sdpa(qd, kd, vd, None).permute(2, 1, 0, 3))
            elif self.dec_slots is not None:  # one decode, scattered blocks: gather exactly its visible keys
                kd = r.k_flat[layer_idx].index_select(0, self.dec_slots).transpose(0, 1)[None]  # (1, n_kv, S, D)
                vd = r.v_flat[layer_idx].index_select(0, self.dec_slots).transpose(0, 1)[None]
                outs.append(_sdpa(qd, kd, vd, None).permute(2, 1, 0, 3))
            else:
                kd, vd = self._gather(layer_idx, self.dec_blocks)
                outs.append(_sdpa(qd, kd, vd, self.dec_mask).permute(2, 1, 0, 3))  # (1, H, B_dec, D)
        for p in self.prefills:
            a, b = p.offset, p.offset + p.num_tokens
            qp = q[:, :, a:b]  # (1, H, T, D)
            if p.direct:
                outs.append(_sdpa(qp, k[:, :, a:b], v[:, :, a:b], None, is_causal=True))
            else:
                kp, vp = self._gather(layer_idx, p.blocks[None])
                outs.append(_sdpa(qp, kp, vp, p.mask))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


class LayerWindows:
    """Gemma 3's mix of sliding-window and global layers: each layer attends through the paged context built for
    its window (both write the same slots of that layer's pool; a layer only ever calls one of them)."""

    def __init__(self, by_window: dict[int | None, PagedAttention], windows: tuple[int | None, ...]):
        self.by_window = by_window
        self.windows = windows

    @property
    def masked(self) -> bool:
        return any(c.masked for c in self.by_window.values())

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.by_window[self.windows[layer_idx]].attend(layer_idx, q, k, v)


def kernel_supported(model: Transformer, prefix_kv: object = None) -> str | None:
    """None when the compiled CPU decode kernel (``lmstack.kernels``) can run this model, else why not."""
    cfg = model.config
    if getattr(model, "_lmstack_tp", 1) > 1:
        return ("tensor parallelism: the kernel runs every layer in one call, with no all-reduce between the "
                "sharded attention and MLP; eager path")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "it runs fp32 on the CPU only"
    if prefix_kv is not None:
        return "prefix / prompt tuning uses the eager path"
    if cfg.head_dim % 2 or cfg.num_attention_heads % cfg.num_key_value_heads:
        return "odd head_dim or heads not a multiple of key/value heads"
    if cfg.num_experts:
        return "mixture-of-experts layers run on the eager path"
    if cfg.is_gemma:
        return "Gemma 3 (four norms per layer, GeGLU, sliding and global layers) runs on the eager path"
    if rope_attention_factor(cfg) != 1.0:
        return "YaRN's RoPE attention factor is not in the kernel"
    from lmstack.quant.packed import KERNEL_LINEARS

    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        mods = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        if any(type(x) not in KERNEL_LINEARS for x in mods):
            return "adapter-wrapped projections (merge the adapter for the kernel path)"
        if len({type(x) for x in mods[:3]}) != 1 or len({type(x) for x in mods[4:6]}) != 1 \
                or len({getattr(x, "group_size", 0) for x in mods}) != 1:
            return "q/k/v or gate/up quantized differently"
        if a.o_proj.bias is not None or any(x.bias is not None for x in mods[4:]):
            return "biases on o_proj or the MLP"
    if type(model.lm_head) not in KERNEL_LINEARS or model.lm_head.bias is not None:
        return "a wrapped lm_head"
    return None


class KernelDecode:
    """Decode-only steps through ``torch.ops.lmstack_cpu.decode_step`` (lmstack/kernels/cpu_decode.cpp):
    one call for all layers and lm_head. The kernel reads every layer's weight as it is stored -- fp32
    row-major, or int8 / int4 (:mod:`lmstack.quant.packed`) -- q/k/v and gate/up either fused
    (``Transformer.fuse_projections(column_major=False)``) or as separate row blocks: no weight is copied."""

    def __init__(self, runner: "ModelRunner"):
        from lmstack.quant.packed import kernel_tensors

        m, cfg = runner.model, runner.model.config
        empty = torch.empty(0)
        ws: list[Tensor] = []
        parts: list[Tensor] = []  # k, v, up when stored apart
        qs: list[Tensor] = []  # per matrix: scale, zero (empty for fp32)
        qz: list[Tensor] = []
        for layer in m.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = a.fused_qkv, mlp.fused_gate_up
            if qkv is not None and not qkv[0].is_contiguous():  # fused column-major for an earlier eager engine
                qkv = None
            if gate_up is not None and not gate_up.is_contiguous():
                gate_up = None
            if qkv is not None:  # fp32 fused by fuse_projections(column_major=False)
                q, k, v, qkv_b = (qkv[0], empty, empty), (empty,) * 3, (empty,) * 3, qkv[1]
            else:
                q, k, v = kernel_tensors(a.q_proj), kernel_tensors(a.k_proj), kernel_tensors(a.v_proj)
                qkv_b = None if a.q_proj.bias is None else \
                    torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach().float()
            if gate_up is not None:
                g, u = (gate_up, empty, empty), (empty,) * 3
            else:
                g, u = kernel_tensors(mlp.gate_proj), kernel_tensors(mlp.up_proj)
            o, d = kernel_tensors(a.o_proj), kernel_tensors(mlp.down_proj)
            ws += [layer.input_layernorm.weight, q[0], qkv_b if qkv_b is not None else empty,
                   a.q_norm.weight if a.q_norm is not None else empty,
                   a.k_norm.weight if a.k_norm is not None else empty,
                   o[0], layer.post_attention_layernorm.weight, g[0], d[0]]
            parts += [k[0], v[0], u[0]]
            for x in (q, o, g, d, k, v, u):
                qs.append(x[1])
                qz.append(x[2])
        head = kernel_tensors(m.lm_head)
        qs.append(head[1])
        qz.append(head[2])
        # an all-fp32 model passes no scales
        self.qscale = qs if any(x.numel() for x in qs) else []
        self.qzero = qz if self.qscale else []
        self.parts = [x.detach() for x in parts]
        self.weights = [w.detach() for w in ws]
        if not all(w.is_contiguous() for w in self.weights + self.parts):
            raise RuntimeError("the kernel path needs contiguous row-major weights")
        self.embed = m.model.embed_tokens.weight.detach().contiguous()  # a copy only after a column-major fuse
        self.norm = m.model.norm.weight.detach()
        self.lm_head = head[0]
        self.inv_freq = rope_inv_freq(cfg).float().contiguous()
        self.k_pool, self.v_pool = runner.k_pool, runner.v_pool
        self.args = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, runner.block_size,
                     float(cfg.rms_norm_eps))
        self.window = cfg.sliding_window
        self.op = torch.ops.lmstack_cpu.decode_step
        self.tuner = ThreadTuner()
        # quantized matrices meet int8 activations (integer dot products, cpu_decode.cpp's header) unless
        # LMSTACK_KERNEL_ACT_Q8=0: then each weight is widened to fp32 and the result is the eager module's
        self.act_q8 = int(bool(self.qscale) and os.environ.get("LMSTACK_KERNEL_ACT_Q8", "1") != "0")

    def __call__(self, batch: list[ScheduledSeq]) -> Tensor:
        """Logits (B, vocab) fp32 for B decode entries (num_tokens == 1)."""
        pos = [s.start for s in batch]
        ids = [s.seq.token_ids[p] for s, p in zip(batch, pos)]
        W = self.window
        lo = [max(0, p - W + 1) for p in pos] if W is not None else [0] * len(pos)
        tables = [s.seq.block_table for s in batch]
        nb = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.long)
        nt = self.tuner.pick()
        t = time.perf_counter()
        out = self.op(torch.tensor(ids), torch.tensor(pos), torch.tensor(lo), bt, self.k_pool, self.v_pool,
                      self.weights, self.embed, self.norm, self.lm_head, self.inv_freq, *self.args, nt,
                      self.parts, self.qscale, self.qzero, self.act_q8)
        self.tuner.record(nt, time.perf_counter() - t)
        return out


class ThreadTuner:
    """Picks the kernel's thread count online. All of torch's threads is fastest on an idle machine; when
    other processes keep the cores busy, threads that meet at a barrier ~60 times a step wait on each
    other's scheduling and one thread can be several times faster. Every ``period`` calls the other
    choice is tried ``trials`` times, interleaved with the current one, and kept if its median is
    ``margin`` faster."""

    def __init__(self, period: int = 128, trials: int = 4, margin: float = 0.9):
        self.period, self.trials, self.margin = period, trials, margin
        self.calls = 0
        self.current = torch.get_num_threads()
        self.samples: dict[int, list[float]] = {}

    def pick(self) -> int:
        n = torch.get_num_threads()
        if n == 1:
            return 1
        self.current = min(self.current, n)
        phase = self.calls % self.period
        if phase < 2 * self.trials:
            alt = 1 if self.current != 1 else n
            return alt if phase % 2 == 0 else self.current
        return self.current

    def record(self, nt: int, seconds: float) -> None:
        phase = self.calls % self.period
        self.calls += 1
        if phase >= 2 * self.trials:
            return
        self.samples.setdefault(nt, []).append(seconds)
        if phase == 2 * self.trials - 1:
            med = {k: sorted(v)[len(v) // 2] for k, v in self.samples.items() if v}
            alt = [k for k in med if k != self.current]
            if alt and self.current in med and med[alt[0]] < self.margin * med[self.current]:
                self.current = alt[0]
            self.samples.clear()


def kv_pool_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero-filled KV pool tensor. On the CPU it lives in an anonymous memory map, whose pages the kernel
    gives zero-filled on first write: the pool is sized for the context limit, but only the blocks requests
    actually use become resident (the block manager hands out the lowest free blocks first), instead of the whole
    pool being written with zeros up front."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import math
    import mmap
    import warnings

    n = math.prod(shape)
    buf = mmap.mmap(-1, max(1, n * torch.empty((), dtype=dtype).element_size()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(buf, dtype=dtype, count=n).view(shape)


def local_kv_heads(model: Transformer) -> int:
    """Key/value heads this process computes: all of them, or its share under tensor parallelism
    (:mod:`lmstack.serve.tp`), so each rank's paged pool holds only its heads."""
    return model.config.num_key_value_heads // getattr(model, "_lmstack_tp", 1)


class ModelRunner:
    """Owns the KV pool and turns a scheduled batch into next-token logits."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 prefix_kv: list[tuple[Tensor, Tensor]] | None = None, use_kernel: bool = False,
                 kernel_max_batch: int = 8):
        cfg = model.config
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.n_kv, self.head_dim = local_kv_heads(model), cfg.head_dim  # this rank's heads under TP
        self.sliding_window = cfg.sliding_window
        # per-layer windows (Gemma 3) or None when every layer has the same one
        aw = cfg.attention_window
        self.layer_windows = aw if isinstance(aw, tuple) else None
        if self.layer_windows is None:
            self.sliding_window = aw
        shape = (num_blocks, block_size, self.n_kv, self.head_dim)
        # zeros, not empty: padded slots are masked, but 0 * NaN garbage would still poison SDPA
        self.k_pool = [kv_pool_tensor(shape, self.dtype, self.device) for _ in range(cfg.num_hidden_layers)]
        self.v_pool = [kv_pool_tensor(shape, self.dtype, self.device) for _ in range(cfg.num_hidden_layers)]
        self.k_flat = [t.view(-1, self.n_kv, self.head_dim) for t in self.k_pool]  # (slots, n_kv, D)
        self.v_flat = [t.view(-1, self.n_kv, self.head_dim) for t in self.v_pool]
        self.prefix_kv = None
        self.num_prefix = 0
        if prefix_kv is not None:
            self.prefix_kv = [(k.to(self.device, self.dtype), v.to(self.device, self.dtype)) for k, v in prefix_kv]
            self.num_prefix = self.prefix_kv[0][0].shape[1]
        self._arange = torch.arange(0, dtype=torch.long, device=self.device)
        self.kernel = KernelDecode(self) if use_kernel else None
        self.kernel_max_batch = kernel_max_batch

    @staticmethod
    def kv_bytes_per_block(model: Transformer, block_size: int) -> int:
        cfg = model.config
        elem = torch.empty((), dtype=model.dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * local_kv_heads(model) * cfg.head_dim * elem

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero these KV blocks in every layer's pool (a block that held non-finite K/V, before it is reused)."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for k, v in zip(self.k_pool, self.v_pool):
            k.index_fill_(0, idx, 0)
            v.index_fill_(0, idx, 0)

    def _key_pos(self, nb: int) -> Tensor:
        """Token positions of the gathered cache slots (nb * bs,) (a cached arange)."""
        n = nb * self.block_size
        if self._arange.numel() < n:
            self._arange = torch.arange(max(n, 2 * self._arange.numel()), device=self.device)
        return self._arange[:n]

    def _visible(self, qpos: Tensor, nb: int, W: int | None) -> Tensor:
        """(Q, P + nb * bs) bool: causal (which also hides slots past the context) + sliding window.

        The P prefix slots sit at absolute indices 0..P-1 and token position p at P + p, as when PEFT
        passes the prefix as past key/values (and as ``lmstack.tune.prompt.PrefixContext``): always
        causal-visible, and out of a sliding window once P + p - j >= window."""
        kpos = self._key_pos(nb)
        vis = kpos[None, :] <= qpos[:, None]
        P = self.num_prefix
        if W is not None:
            vis &= qpos[:, None] - kpos[None, :] < W
        if P:
            pre = torch.ones(qpos.shape[0], P, dtype=torch.bool, device=self.device)
            if W is not None:
                pre = (qpos[:, None] + P) - torch.arange(P, device=self.device)[None, :] < W
            vis = torch.cat([pre, vis], 1)
        return vis

    # ------------------------------------------------------------------ prepare
    def prepare(self, batch: list[ScheduledSeq]) -> tuple[Tensor, Tensor, PagedAttention | LayerWindows, list[int]]:
        """Pack a batch: input_ids, position_ids (1, N), the attention context, and the packed index of
        each sequence's last token where it needs a sample (in batch order, -1 where none)."""
        if self.layer_windows is None:
            return self._prepare(batch, self.sliding_window)
        by_window: dict[int | None, PagedAttention] = {}
        for W in dict.fromkeys(self.layer_windows):
            input_ids, position_ids, by_window[W], sample_idx = self._prepare(batch, W)
        return input_ids, position_ids, LayerWindows(by_window, self.layer_windows), sample_idx

    def _prepare(self, batch: list[ScheduledSeq], W: int | None) -> tuple[Tensor, Tensor, PagedAttention, list[int]]:
        bs, P = self.block_size, self.num_prefix
        decode = [s for s in batch if s.num_tokens == 1]
        prefill = [s for s in batch if s.num_tokens > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        for s in decode:
            p = s.start
            ids.append(s.seq.token_ids[p])
            pos.append(p)
            slots.append(s.seq.block_table[p // bs] * bs + p % bs)
        dec_blocks = dec_mask = dec_span = dec_slots = None
        if len(decode) == 1 and P == 0:
            dec_span = self._contiguous_span(decode[0], W)
            if dec_span is None:
                dec_slots = self._visible_slots(decode[0], W)
        if decode and dec_span is None and dec_slots is None:
            nb = max(len(s.seq.block_table) for s in decode)
            dec_blocks = torch.tensor([s.seq.block_table + [0] * (nb - len(s.seq.block_table)) for s in decode],
                                      dtype=torch.long, device=self.device)
            qpos = torch.tensor(pos, dtype=torch.long, device=self.device)  # (B_dec,)
            vis = self._visible(qpos, nb, W)[:, None, None, :]  # (B_dec, 1, 1, P + S)
            # additive float mask, built once per step (a bool mask is converted by SDPA in every layer)
            dec_mask = torch.zeros(vis.shape, dtype=self.dtype, device=self.device).masked_fill_(~vis, float("-inf"))
        prefills: list[_Prefill] = []
        for s in prefill:
            seq, c, n = s.seq, s.start, s.num_tokens
            offset = len(ids)
            ids.extend(seq.token_ids[c:c + n])
            pos.extend(range(c, c + n))
            bt = seq.block_table
            slots.extend(bt[p // bs] * bs + p % bs for p in range(c, c + n))
            direct = c == 0 and P == 0 and (W is None or n <= W)
            blocks = mask = None
            if not direct:
                nb = self.blocks_for(c + n)
                blocks = torch.tensor(bt[:nb], dtype=torch.long, device=self.device)
                mask = self._visible(torch.arange(c, c + n, device=self.device), nb, W)[None, None]  # (1, 1, T, P + S)
            prefills.append(_Prefill(offset, n, direct, blocks, mask))
        # packed order: decodes then prefills; map each batch entry to its last packed index
        last: dict[int, int] = {}
        for i, s in enumerate(decode):
            last[id(s)] = i
        for s, p in zip(prefill, prefills):
            last[id(s)] = p.offset + p.num_tokens - 1
        sample_idx = [last[id(s)] if s.needs_sample else -1 for s in batch]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([pos], dtype=torch.long, device=self.device) + P
        ctx = PagedAttention(self, torch.tensor(slots, dtype=torch.long, device=self.device), len(decode),
                             dec_blocks, dec_mask, prefills, dec_span, dec_slots)
        return input_ids, position_ids, ctx, sample_idx

    def _contiguous_span(self, s: ScheduledSeq, W: int | None) -> tuple[int, int] | None:
        """Slot range of the keys a single decode token sees, when its blocks are consecutive in the pool
        (the usual case at batch 1): attention then reads a view instead of a gathered copy."""
        bs, bt = self.block_size, s.seq.block_table
        end = s.start + 1  # context length including the new token
        lo = 0 if W is None else max(0, end - W)
        b0, b1 = lo // bs, (end - 1) // bs
        first = bt[b0]
        if any(bt[i] != first + i - b0 for i in range(b0 + 1, b1 + 1)):
            return None
        base = first * bs - b0 * bs
        return base + lo, base + end

    def _visible_slots(self, s: ScheduledSeq, W: int | None) -> Tensor:
        """(S,) pool slots of the keys a single decode token sees (its causal / sliding-window range), in
        position order: attention then needs no mask."""
        bs, bt = self.block_size, s.seq.block_table
        end = s.start + 1
        lo = 0 if W is None else max(0, end - W)
        b0, b1 = lo // bs, (end - 1) // bs
        blocks = torch.tensor(bt[b0:b1 + 1], dtype=torch.long, device=self.device)  # (nb,)
        slots = (blocks[:, None] * bs + self._key_pos(1)[None, :]).view(-1)  # (nb * bs,)
        return slots[lo - b0 * bs:end - b0 * bs]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ run
    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> tuple[Tensor | None, list[int]]:
        """Forward the batch. Returns fp32 logits (M, vocab) for the M entries that need a sample, and
        for each batch entry its row in those logits (-1 where none)."""
        if (self.kernel is not None and len(batch) <= self.kernel_max_batch
                and all(s.num_tokens == 1 and s.needs_sample for s in batch)):
            return self.kernel(batch), list(range(len(batch)))
        input_ids, position_ids, ctx, sample_idx = self.prepare(batch)
        backends = sdpa_backends(self.device, ctx.masked)
        with contextlib.nullcontext() if backends is None else _sdpa_kernel(backends):
            h = self.model.hidden_states(input_ids, position_ids=position_ids, ctx=ctx)  # (1, N, hidden)
        rows = [i for i in sample_idx if i >= 0]
        if not rows:
            return None, [-1] * len(batch)
        sel = h[0] if rows == list(range(h.shape[1])) else h[0, rows]  # (M, hidden)
        logits = self.model.lm_head(sel).float()  # (M, vocab)
        out_rows, k = [], 0
        for i in sample_idx:
            out_rows.append(k if i >= 0 else -1)
            k += i >= 0
        return logits, out_rows
