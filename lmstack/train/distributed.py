"""Process groups and model wrapping: none, DDP, or FSDP2 (``torch.distributed.fsdp.fully_shard``).

Launch with ``torchrun`` (one process per GPU, or per CPU socket with gloo); the environment variables
it sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) are all this module reads.
References: PyTorch DDP (Li et al., VLDB 2020); FSDP2 per-parameter sharding (PyTorch 2.4+ ``fully_shard``,
torchtitan). Activation checkpointing per block: Chen et al., "Training Deep Nets with Sublinear Memory
Cost" (2016), applied with ``torch.utils.checkpoint`` (non-reentrant) on each decoder block's forward so
the parameter names -- and so the Hugging Face checkpoint keys -- do not change.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train.config import TrainConfig
from lmstack.utils.device import resolve_device


@dataclass
class DistInfo:
    kind: str  # "none" | "ddp" | "fsdp" | "tp" (tensor parallel only); fsdp with tp_size > 1 is the 2-D mesh
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_size: int = 1

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP2 and/or tensor parallel): checkpoints go through DCP."""
        return self.kind in ("fsdp", "tp")

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the processes that see different batches."""
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size  # the mesh is (dp, tp) with tp the inner, contiguous dimension

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.kind != "none"


def setup(cfg: TrainConfig) -> DistInfo:
    """Join the torchrun process group (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    kind = cfg.distributed
    tp = cfg.tp_size
    if tp > 1:
        if world % tp:
            raise ConfigError(f"train.tp_size={tp} must divide the number of processes ({world}); launch with "
                              f"torchrun --nproc_per_node {tp} (or a multiple for a 2-D FSDP2 x TP mesh)")
        dp = world // tp
        if kind == "ddp" or (kind == "none" and dp > 1):
            raise ConfigError(f"train.tp_size={tp} with {dp} data-parallel replicas composes with FSDP2 only; "
                              "set train.distributed=fsdp (or auto)")
        kind = "fsdp" if dp > 1 else "tp"
    elif kind == "auto":
        kind = "ddp" if world > 1 else "none"
    if kind != "none" and world == 1 and not (dist.is_available() and dist.is_initialized()):
        kind = "none"  # a single process needs no wrapper; same numerics
    if kind == "none" and world > 1:
        raise ConfigError(f"train.distributed=none but {world} processes were launched; use ddp or fsdp")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if kind == "none":
        return DistInfo("none", 0, 1, 0, device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(kind, dist.get_rank(), dist.get_world_size(), local_rank, device, tp)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks: the first ``ModuleList`` named ``layers`` (``model.model.layers`` in the
    Transformer; found also when a wrapper such as a prompt-tuning module holds the Transformer)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return list(mod)
    return []


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward; returns how many blocks were wrapped."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for blk in blocks(model):
        if getattr(blk, "_lmstack_ac", False):
            continue
        orig = blk.forward

        @functools.wraps(orig)
        def fwd(*args, _orig=orig, **kw):
            if not torch.is_grad_enabled():
                return _orig(*args, **kw)
            return checkpoint(_orig, *args, use_reentrant=False, **kw)

        blk.forward = fwd  # instance attribute: module names and state-dict keys stay the same
        blk._lmstack_ac = True
        n += 1
    if n == 0:
        raise ConfigError("train.activation_checkpointing needs a model with model.layers (decoder blocks)")
    return n


def apply_compile(model: nn.Module) -> None:
    """torch.compile per block (in place, names unchanged; composes with FSDP2), else the whole model."""
    bl = blocks(model)
    if bl:
        for b in bl:
            b.compile()
    else:
        model.compile()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """Return the module the loop calls: the model itself, a DDP wrapper, or the model sharded in place."""
    if info.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if info.tp_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from lmstack.train.tensor_parallel import parallelize

        mesh2 = init_device_mesh(info.device.type, (info.dp_size, info.tp_size), mesh_dim_names=("dp", "tp"))
        parallelize(model, mesh2["tp"])
        if info.kind == "tp":
            return model
        if any(getattr(b.self_attn, "q_norm", None) is not None for b in blocks(model)):
            raise ConfigError("FSDP2 x tensor parallel (2-D mesh) does not support per-head q/k norms (Qwen3) yet; "
                              "use tensor parallelism alone (train.tp_size = processes) or FSDP2 alone")
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh2["dp"]
        for b in blocks(model):
            fully_shard(b, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model
    if info.kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for b in blocks(model):
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(getattr(module, "module"), nn.Module) \
        and type(module).__name__ == "DistributedDataParallel" else module


def no_sync(module: nn.Module, info: DistInfo, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    import contextlib

    if sync or info.kind not in ("ddp", "fsdp"):
        return contextlib.nullcontext()
    if info.kind == "ddp":
        return module.no_sync()

    @contextlib.contextmanager
    def _fsdp():
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    return _fsdp()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    if not info.active:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
