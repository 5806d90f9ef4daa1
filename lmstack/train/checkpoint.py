"""Self-describing, atomic checkpoints and ``--resume auto``.

Layout of ``run_dir/checkpoints/step_000500/``::

    config.json model.safetensors tokenizer.json ...   the model directory (save_model_fn; HF layout by default)
    trainer_state.pt                                  step, optimizer, RNG states (per process), data position,
                                                      bad-step counts, tokens seen, best val loss; only
                                                      tensors / numbers / strings, read back with
                                                      ``torch.load(weights_only=True)`` (never a full unpickle)
    config.yaml                                       the run's resolved config
    dcp/                                              FSDP2 only: sharded model + optimizer
                                                      (torch.distributed.checkpoint), what a resume loads

Everything is written into ``checkpoints/.step_000500.tmp`` and renamed when complete, so a directory named
``step_*`` holding ``trainer_state.pt`` is always whole (a run killed mid-save leaves only a ``.tmp``).
With a custom ``save_model_fn`` (adapters) the trained parameters are also stored in ``trainer_state.pt``,
since only the writer knows how to read its own format back.
References: litgpt / torchtune checkpoint layouts; PyTorch Distributed Checkpoint (DCP) docs.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from lmstack.config import save_config
from lmstack.errors import CheckpointError
from lmstack.train import distributed as D
from lmstack.utils.io import atomic_dir

FORMAT = "lmstack-trainer-state-v1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    elapsed_s: float = 0.0


# ------------------------------------------------------------------------------------------ discovery
def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``"auto"``: newest checkpoint of ``run_dir`` (None if there is none). A path: a checkpoint directory,
    or a run directory (its newest checkpoint)."""
    if not resume:
        return None
    if resume == "auto":
        ck = list_checkpoints(run_dir)
        return ck[-1][1] if ck else None
    p = Path(resume)
    if (p / "trainer_state.pt").is_file():
        return p
    ck = list_checkpoints(p)
    if ck:
        return ck[-1][1]
    raise CheckpointError(f"--resume {resume}: no trainer_state.pt there and no checkpoints/step_* under it; "
                          "pass a checkpoint directory, a run directory, or 'auto'")


# ------------------------------------------------------------------------------------------ model writing
class ModelWriter:
    """Writes the model directory of a checkpoint / the final model, on rank 0 (gathering FSDP2 shards)."""

    def __init__(self, model: nn.Module, info: D.DistInfo, save_model_fn: Callable | None,
                 tokenizer_dir: str | Path | None):
        self.model, self.info, self.fn, self.tokenizer_dir = model, info, save_model_fn, tokenizer_dir

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        if not self.info.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write(self, out_dir: Path, full_state: dict[str, torch.Tensor] | None) -> None:
        """Rank 0 only; ``full_state`` from :meth:`_full_state` (collective) under FSDP2."""
        if self.fn is not None:
            self.fn(self.model, out_dir)
            return
        from lmstack.model import save_model

        save_model(self.model, out_dir, tokenizer_dir=self.tokenizer_dir, state_dict=full_state)

    def write_final(self, final_dir: Path) -> None:
        full = self._full_state()  # collective
        if self.info.is_main:
            with atomic_dir(final_dir) as tmp:
                self.write(tmp, full)
        D.barrier(self.info)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """RNG states as tensors, ints and tuples only, so ``torch.load(weights_only=True)`` reads them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ------------------------------------------------------------------------------------------ save / load
def write_config(cfg: BaseModel, path: Path) -> None:
    save_config(cfg, path)


def save(run_dir: Path, state: TrainerState, model: nn.Module, optimizer: torch.optim.Optimizer,
         train_data: Any, info: D.DistInfo, writer: ModelWriter, run_config: BaseModel, keep_last: int) -> Path:
    """Write ``checkpoints/step_XXXXXX`` atomically (collective under DDP/FSDP2); prune to ``keep_last``."""
    root = run_dir / "checkpoints"
    name = f"step_{state.step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    D.barrier(info)
    if info.sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    full = writer._full_state()
    rngs = D.gather_objects(rng_state(), info)
    if info.is_main:
        writer.write(tmp, full)
        ts: dict[str, Any] = {
            "format": FORMAT, **asdict(state), "world_size": info.world_size, "distributed": info.kind,
            "optimizer": None if info.sharded else optimizer.state_dict(), "tp_size": info.tp_size,
            "data": train_data.state_dict() if hasattr(train_data, "state_dict") else None,
            "rng": rngs,
            "params": None if (writer.fn is None or info.sharded) else _trained_params(model, optimizer),
        }
        torch.save(ts, tmp / "trainer_state.pt")
        write_config(run_config, tmp / "config.yaml")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier(info)
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_data: Any, info: D.DistInfo,
         default_writer: bool, trained: list[nn.Parameter]) -> TrainerState:
    """Restore weights, optimizer, data position and RNG from a checkpoint; return the counters."""
    ts = read_trainer_state(path)
    was_fsdp, is_fsdp = ts.get("distributed") in ("fsdp", "tp"), info.sharded
    if was_fsdp != is_fsdp:
        raise CheckpointError(
            f"{path} was written with distributed={ts.get('distributed')} but this run uses {info.kind}; "
            "resume with the same train.distributed, or start a new run from the checkpoint's model directory")
    if is_fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        if ts.get("params") is not None:
            _load_trained_params(model, ts["params"], path)
        elif default_writer:
            _load_model_dir(model, path)
        else:
            raise CheckpointError(f"{path}: trainer_state.pt has no trained parameters to resume from")
        optimizer.load_state_dict(ts["optimizer"])
    if ts.get("data") is not None and hasattr(train_data, "load_state_dict"):
        train_data.load_state_dict(ts["data"])
    rngs = ts.get("rng") or []
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    elif rngs:
        set_rng_state(rngs[0])
    keys = TrainerState.__dataclass_fields__
    return TrainerState(**{k: ts[k] for k in keys if k in ts})


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.pt`` read with ``weights_only=True``: tensors, numbers, strings and containers only.
    A checkpoint is untrusted input (it may come from anywhere), and a full unpickle would run any code
    the file names before the format check (PyTorch security note on ``torch.load``)."""
    f = path / "trainer_state.pt"
    try:
        ts = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: cannot read it as an lmstack trainer state (only tensors, numbers and "
                              f"strings are loaded; {first[:200]}); resume from another checkpoint") from None
    if not isinstance(ts, dict) or ts.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not an lmstack trainer state ({FORMAT}); resume from another checkpoint")
    return ts


def _trained_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) in ids}


def _load_trained_params(model: nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    named = dict(model.named_parameters())
    missing = [k for k in saved if k not in named]
    if missing:
        raise CheckpointError(f"{path}: checkpoint has parameter {missing[0]} that the model lacks "
                              "(was the adapter configured differently?)")
    with torch.no_grad():
        for k, t in saved.items():
            named[k].copy_(t)


def _load_model_dir(model: nn.Module, path: Path) -> None:
    from lmstack.model import read_state_dict

    sd = read_state_dict(path)
    res = model.load_state_dict(sd, strict=False)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing = [k for k in res.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        bad = (missing or res.unexpected_keys)[0]
        raise CheckpointError(f"{path}: checkpoint weights do not match the model (e.g. {bad}); "
                              "resume with the same model config")
