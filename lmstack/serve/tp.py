"""Tensor parallelism for the serving engine: vLLM's layout at nano-vllm's size.

``lmstack.load(DIR, tensor_parallel=N)`` / ``lmstack serve|generate --model DIR --tp N``: the calling process is
rank 0; it starts ranks 1..N-1 (a fresh ``python -m lmstack.serve.tp`` per rank, so the caller's ``__main__`` is
never re-imported; a ``TCPStore`` on a free port of 127.0.0.1 for the rendezvous; gloo on the CPU, NCCL on CUDA
with rank r on ``cuda:r``).

- **Weights.** Every rank loads the directory and keeps only its shard, cut by the training plan
  (:func:`lmstack.train.tensor_parallel.block_plan`, the one definition of what is column / row parallel):
  q/k/v and gate/up column-parallel (rank r computes query heads ``r*H/N ..``, key/value heads ``r*KV/N ..`` and
  its slice of the intermediate channels), o_proj / down_proj row-parallel followed by one all-reduce each, so
  every rank holds the full hidden state after each block; the embedding is vocab-parallel (each rank looks up
  the ids it owns, an all-reduce sums them) and lm_head column-parallel over the vocabulary (an all-gather
  assembles the logits). Norms, routers and MoE experts stay replicated. Row-parallel biases are added once
  (rank 0 keeps them). Tied embeddings stay tied (the head and the table are the same vocabulary shard).
- **KV cache.** Each rank's paged pool holds only its key/value heads (``KV/N``): the cache memory per rank is
  ``1/N`` of the single-process pool for the same number of blocks.
- **Steps.** Rank 0 runs the scheduler, the sampler and the API. Each step it sends the batch description --
  per scheduled sequence: the first position, the token count, whether it samples, its block table and the
  tokens of this step -- to every worker as a packed int64 message over its stdin (no pickling; vLLM also keeps
  this control path off the collective backend), then all ranks run the same forward; the collectives carry
  only activations. Rank 0 samples from the gathered logits.
- **Fallbacks.** The compiled CPU decode kernel (``lmstack.kernels``) runs the whole model in one call and has
  no all-reduce between layers, so a TP engine decodes on the eager path (``kernel_supported`` says so).
  Prompt log-probs / embeddings (``/v1/embeddings``, ``echo``), prefix / prompt adapters, quantized
  checkpoints and speculative decoding are refused with one line; a LoRA adapter is merged on every rank.
- **Shutdown.** :meth:`TPGroup.close` (``LLM.close``, and at interpreter exit) sends STOP and joins the workers,
  terminating any that do not exit. Workers run in their own session and ignore SIGINT (Ctrl-C reaches rank 0,
  which stops them), die with their parent (``PR_SET_PDEATHSIG``) and leave when the pipe to rank 0 closes: no
  orphans.

Reference: Shoeybi et al. 2019 (Megatron-LM); vLLM ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``VocabParallelEmbedding`` and its executor's broadcast of the scheduler output.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import time
from array import array
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import ConfigError

log = logging.getLogger(__name__)

STOP, INIT, RUN, ZERO = 0, 1, 2, 3
START_TIMEOUT_S = 300.0  # a worker that neither reports nor dies within this is given up on


# ---------------------------------------------------------------------------------------------- sharding
class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + n)`` of the embedding table; ids outside give zeros, an all-reduce sums the ranks.
    ``scale``: Gemma's sqrt(hidden) factor (rounded to the table's dtype, as :class:`ScaledEmbedding`)."""

    def __init__(self, weight: Tensor, start: int, scale: float | None, group: Any):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.n = start, weight.shape[0]
        self.scale = scale
        self.group = group

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        own = (local >= 0) & (local < self.n)
        x = F.embedding(local.clamp(0, self.n - 1), self.weight) * own[..., None].to(self.weight.dtype)
        dist.all_reduce(x, group=self.group)
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=self.weight.dtype)
        return x


def _all_reduce_hook(group: Any):
    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        dist.all_reduce(out, group=group)
        return out

    return hook


def _all_gather_hook(group: Any, world: int):
    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        out = out.contiguous()
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out, group=group)
        return torch.cat(parts, -1)

    return hook


def _keep(t: Tensor | None, dim: int, rank: int, tp: int) -> Tensor | None:
    """Rank ``rank``'s contiguous 1/tp slice of ``t`` along ``dim`` (a copy, so the full tensor can be freed)."""
    if t is None:
        return None
    n = t.shape[dim] // tp
    return t.detach().narrow(dim, rank * n, n).contiguous().clone()


def _set_linear(lin: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    lin.out_features, lin.in_features = weight.shape


def check_shardable(model: nn.Module, tp: int) -> None:
    """Refuse, with one line, a model the engine cannot split over ``tp`` ranks."""
    from lmstack.train.tensor_parallel import block_plan, check_tp

    check_tp(model.config, tp, hint="pick a --tp dividing them")
    for i, block in enumerate(model.model.layers):
        for name in block_plan(block):
            m = block.get_submodule(name)
            if type(m) is not nn.Linear:
                raise ConfigError(f"tensor parallelism serves float checkpoints with plain linear layers; "
                                  f"model.layers.{i}.{name} is a {type(m).__name__} (serve quantized or adapter-"
                                  f"wrapped models with --tp 1, or merge the adapter)")
    if not isinstance(model.lm_head, nn.Linear) or model.lm_head.bias is not None:
        raise ConfigError("tensor parallelism needs a plain lm_head without bias")


def shard_model(model: nn.Module, rank: int, tp: int, group: Any = None) -> nn.Module:
    """Keep rank ``rank``'s shard of every split weight of a loaded :class:`~lmstack.model.Transformer`, in place,
    and install the all-reduces (after o_proj, down_proj and the embedding) and the logits all-gather."""
    from lmstack.train.tensor_parallel import COLWISE, block_plan

    check_shardable(model, tp)
    emb = model.model.embed_tokens
    tied = model.lm_head.weight is emb.weight
    shard = _keep(emb.weight, 0, rank, tp)
    model.model.embed_tokens = VocabParallelEmbedding(shard, rank * shard.shape[0], getattr(emb, "scale", None),
                                                      group)
    head = model.lm_head
    if tied:
        head.weight = model.model.embed_tokens.weight
        head.out_features = shard.shape[0]
    else:
        _set_linear(head, _keep(head.weight, 0, rank, tp), None)
    head.register_forward_hook(_all_gather_hook(group, tp))
    for block in model.model.layers:
        for name, kind in block_plan(block).items():
            lin = block.get_submodule(name)
            if kind == COLWISE:  # output features: heads / intermediate channels
                _set_linear(lin, _keep(lin.weight, 0, rank, tp), _keep(lin.bias, 0, rank, tp))
            else:  # input features; the bias is added once, after the sum
                bias = None if lin.bias is None else (lin.bias.detach().clone() if rank == 0
                                                      else torch.zeros_like(lin.bias))
                _set_linear(lin, _keep(lin.weight, 1, rank, tp), bias)
                lin.register_forward_hook(_all_reduce_hook(group))
        attn = block.self_attn
        attn.n_heads //= tp
        attn.n_kv //= tp
    model._lmstack_tp = tp
    return model


# ---------------------------------------------------------------------------------------------- messages
def _pack(op: int, body: list[int]) -> bytes:
    return array("q", [op, *body]).tobytes()


def _unpack(msg: bytes) -> tuple[int, list[int]]:
    a = array("q")
    a.frombytes(msg)
    return a[0], a[1:].tolist()


def encode_batch(batch: list) -> list[int]:
    """Per scheduled sequence: start, num_tokens, needs_sample, len(block_table), block_table, this step's tokens."""
    out = [len(batch)]
    for s in batch:
        bt = s.seq.block_table
        out += [s.start, s.num_tokens, int(s.needs_sample), len(bt), *bt]
        out += s.seq.token_ids[s.start:s.start + s.num_tokens]
    return out


class _Tokens:
    """The slice of a sequence's tokens one step reads, indexed by absolute position."""

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.ids[i.start - self.start:i.stop - self.start]
        return self.ids[i - self.start]


class _Seq:
    def __init__(self, start: int, ids: list[int], block_table: list[int], num_tokens: int):
        self.token_ids = _Tokens(start, ids)
        self.block_table = block_table
        self.num_tokens = num_tokens


def decode_batch(body: list[int]) -> list:
    from lmstack.serve.scheduler import ScheduledSeq

    n, i, out = body[0], 1, []
    for _ in range(n):
        start, num, sample, nb = body[i:i + 4]
        i += 4
        bt = body[i:i + nb]
        i += nb
        ids = body[i:i + num]
        i += num
        seq = _Seq(start, ids, bt, start + num + (0 if sample else 1))
        out.append(ScheduledSeq(seq, start, num))
    return out


# ---------------------------------------------------------------------------------------------- rank 0
def _join(p: Any, timeout: float) -> None:
    import subprocess

    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


class TPGroup:
    """Rank 0's handle on the worker processes: the pipes to them and their shutdown."""

    def __init__(self, tp: int, procs: list, conns: list):
        self.tp = tp
        self.procs = procs
        self.conns = conns
        self.in_step = False  # a collective may be in flight: a graceful STOP could not be heard
        self.closed = False
        self.threads_before: int | None = None  # rank 0's torch threads before it took its 1/tp share
        atexit.register(self.close)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send(self, op: int, body: list[int]) -> None:
        msg = _pack(op, body)
        for c in self.conns:
            c.send_bytes(msg)

    def close(self, timeout: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.in_step:
            try:
                self.send(STOP, [])
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            _join(p, max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                _join(p, 5)
            if p.poll() is None:
                p.kill()
                _join(p, 5)
        for c in self.conns:
            c.close()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
        atexit.unregister(self.close)


class TPRunner:
    """Rank 0's runner: sends each step to the workers, then runs its own shard (which joins their collectives)."""

    def __init__(self, runner: Any, group: TPGroup, fused: bool):
        self.inner = runner
        self.tp = group
        group.send(INIT, [runner.num_blocks, runner.block_size, int(fused)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, batch: list) -> tuple[Tensor | None, list[int]]:
        g = self.tp
        if g.closed:
            raise ConfigError("the tensor-parallel workers were stopped")
        g.in_step = True
        g.send(RUN, encode_batch(batch))
        out = self.inner.run(batch)
        g.in_step = False
        return out

    def zero_blocks(self, blocks: list[int]) -> None:
        self.tp.send(ZERO, list(blocks))
        self.inner.zero_blocks(blocks)


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def check_tp_request(tp: int, device: torch.device) -> None:
    """Refuse a --tp the machine cannot give: more ranks than GPUs (CUDA) or CPU cores, a kernel requirement."""
    from lmstack.kernels import mode as kernel_mode

    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    if device.type == "cuda":
        have = torch.cuda.device_count() - (device.index or 0)
        if tp > have:
            raise ConfigError(f"--tp {tp} needs {tp} CUDA devices from {device}; {max(have, 0)} available")
    elif device.type == "cpu":
        have = os.cpu_count() or 1
        if tp > have:
            raise ConfigError(f"--tp {tp} needs a CPU core per rank; this machine has {have}")
    else:
        raise ConfigError(f"tensor parallelism runs on cpu (gloo) or cuda (nccl), not {device.type}")
    if kernel_mode() == "on" and device.type == "cpu":
        raise ConfigError("LMSTACK_KERNELS=on requires the compiled CPU decode kernel, which does not run under "
                          "tensor parallelism (no all-reduce between layers); set LMSTACK_KERNELS=auto or use --tp 1")
    if dist.is_initialized():
        raise ConfigError("the engine's tensor parallelism starts its own process group and this process already "
                          "has one (another --tp engine: close it first with LLM.close(); or a torchrun launch: "
                          "start lmstack serve --tp without torchrun)")


class Pipe:
    """Length-prefixed byte messages over a pair of binary file objects (a worker's stdin / stdout)."""

    def __init__(self, rfile: Any, wfile: Any):
        self.r, self.w = rfile, wfile

    def send_bytes(self, msg: bytes) -> None:
        self.w.write(len(msg).to_bytes(8, "little") + msg)
        self.w.flush()

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.r.read(n - len(buf))
            if not chunk:
                raise EOFError("the pipe closed")
            buf += chunk
        return buf

    def recv_bytes(self) -> bytes:
        return self._read(int.from_bytes(self._read(8), "little"))

    def poll(self, timeout: float) -> bool:
        import select

        return bool(select.select([self.r], [], [], timeout)[0])

    def close(self) -> None:
        for f in (self.r, self.w):
            try:
                f.close()
            except OSError:
                pass


def _wait(group_procs: list, conns: list, what: str, timeout: float = START_TIMEOUT_S) -> str | None:
    """Wait for one message from every worker; returns the first error text (or None)."""
    deadline = time.monotonic() + timeout
    for rank, (p, c) in enumerate(zip(group_procs, conns), start=1):
        while not c.poll(0.2):
            if p.poll() is not None:
                return f"tensor-parallel rank {rank} exited (code {p.returncode}) while {what}"
            if time.monotonic() > deadline:
                return f"tensor-parallel rank {rank} did not finish {what} in {timeout:.0f} s"
        try:
            msg = c.recv_bytes().decode("utf-8", "replace")
        except EOFError:
            return f"tensor-parallel rank {rank} exited while {what}"
        if msg.startswith("error:"):
            return msg[len("error:"):].strip()
    return None


def start(model: nn.Module, spec: dict[str, Any], tp: int) -> TPGroup:
    """Spawn ranks 1..tp-1 for ``spec`` (path, adapter, dtype, merge_lora: what rank 0 loaded ``model`` from),
    join them in a process group and shard ``model`` (rank 0's copy) in place. Returns the group."""
    import json
    import subprocess

    device = model.device
    check_shardable(model, tp)
    check_tp_request(tp, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    threads = max(1, torch.get_num_threads() // tp) if device.type == "cpu" else torch.get_num_threads()
    store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=START_TIMEOUT_S))
    spec = {**spec, "backend": backend, "device": str(device), "threads": threads, "port": store.port, "tp": tp}
    root = str(Path(__file__).resolve().parents[2])  # the workers import this lmstack, not another
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    procs, conns = [], []
    group = None
    try:
        for rank in range(1, tp):
            # a fresh interpreter (not multiprocessing): the caller's __main__ is never re-imported
            # its own session: a terminal's Ctrl-C reaches rank 0 only, which then stops the workers
            p = subprocess.Popen([sys.executable, "-m", "lmstack.serve.tp", str(rank), json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env,
                                 start_new_session=True)
            procs.append(p)
            conns.append(Pipe(p.stdout, p.stdin))
        group = TPGroup(tp, procs, conns)
        err = _wait(procs, conns, "starting")
        if err:
            raise ConfigError(err)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=0, world_size=tp,
                                timeout=timedelta(seconds=START_TIMEOUT_S))
        if device.type == "cpu":
            group.threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        shard_model(model, 0, tp, dist.group.WORLD)
        err = _wait(procs, conns, "loading its shard")
        if err:
            raise ConfigError(err)
    except BaseException:
        if group is not None:
            group.in_step = True  # no graceful STOP: the workers may be anywhere
            group.close(timeout=0)
        else:
            for p in procs:
                p.kill()
        raise
    log.info("tensor parallelism: %d ranks (%s), worker pids %s", tp, backend, group.pids)
    return group


# ---------------------------------------------------------------------------------------------- workers
def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (no orphan if rank 0 is killed)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_main(rank: int, spec: dict[str, Any]) -> None:
    """Rank ``rank`` (``python -m lmstack.serve.tp RANK SPEC_JSON``, started by :func:`start`): load and shard the
    model, then follow rank 0's steps, read from stdin, until STOP or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops us
    _die_with_parent()
    # the control channel is the original stdout; anything printed goes to stderr instead
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    conn = Pipe(sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer, out)
    tp = int(spec["tp"])
    try:
        conn.send_bytes(b"started")
        device = rank_device(torch.device(spec["device"]), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.set_num_threads(int(spec["threads"]))
        store = dist.TCPStore("127.0.0.1", int(spec["port"]), tp, is_master=False,
                              timeout=timedelta(seconds=START_TIMEOUT_S))
        dist.init_process_group(spec["backend"], store=store, rank=rank, world_size=tp,
                                timeout=timedelta(seconds=START_TIMEOUT_S))
        from lmstack.serve.llm import load_weights

        model, _ = load_weights(spec["path"], spec.get("adapter"), device, spec.get("dtype"),
                                spec.get("merge_lora", True))
        shard_model(model.eval(), rank, tp, dist.group.WORLD)
        conn.send_bytes(b"ok")
    except BaseException as e:  # noqa: BLE001 - reported to rank 0 in one line
        try:
            conn.send_bytes(f"error: rank {rank}: {type(e).__name__}: {e}".encode())
        except OSError:
            pass
        return
    try:
        _serve_steps(model, conn)
    except (EOFError, OSError, RuntimeError) as e:  # rank 0 went away (pipe closed, peer reset)
        log.debug("tensor-parallel rank %d stopping: %s", rank, e)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _serve_steps(model: nn.Module, conn: Any) -> None:
    from lmstack.serve.runner import ModelRunner

    runner = None
    while True:
        op, body = _unpack(conn.recv_bytes())
        if op == STOP:
            return
        if op == INIT:
            num_blocks, block_size, fused = body
            if fused:
                model.fuse_projections(column_major=True)
            runner = ModelRunner(model, num_blocks, block_size)
        elif op == RUN:
            runner.run(decode_batch(body))
        elif op == ZERO:
            runner.zero_blocks(body)


__all__ = ["shard_model", "check_shardable", "start", "TPGroup", "TPRunner", "VocabParallelEmbedding",
           "encode_batch", "decode_batch"]


if __name__ == "__main__":
    import json

    worker_main(int(sys.argv[1]), json.loads(sys.argv[2]))
