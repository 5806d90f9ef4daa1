"""Open an untrusted GGUF file: check the header and every tensor's extent before trusting the ``gguf`` reader.

GGUF (ggml ``docs/gguf.md``): ``b"GGUF"``, a uint32 version, uint64 tensor and key-value counts, the key-values,
the tensor infos (name, dims, type, offset) and the aligned tensor data. Nothing in the file is executed or
unpickled; the values are numbers, strings and arrays of them, read through ``gguf.GGUFReader`` (numpy memmap).
A truncated file, a wrong magic, absurd counts or a tensor that runs past the end of the file raise a
:class:`~lmstack.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import CheckpointError

MAX_TENSORS = 1 << 16
MAX_KV = 1 << 14


@dataclass
class GGUFTensor:
    name: str
    type_name: str  # "F32", "Q4_1", ...
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy / PyTorch order (rows first), the reverse of GGML's ne[]
    data: np.ndarray  # memmap'd raw data as the gguf reader exposes it


@dataclass
class GGUFFile:
    path: Path
    meta: dict[str, Any]  # key -> int / float / bool / str / list
    tensors: dict[str, GGUFTensor]


def _header(path: Path) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    if len(head) < 24:
        raise CheckpointError(f"{path}: truncated GGUF file ({len(head)} bytes); download or export it again")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise CheckpointError(f"{path}: header claims {n_tensors} tensors and {n_kv} keys, more than lmstack "
                              f"accepts ({MAX_TENSORS} / {MAX_KV}); the file is corrupt")
    return version, n_tensors, n_kv


def _value(field: Any) -> Any:
    v = field.contents()
    if isinstance(v, (np.generic,)):
        v = v.item()
    return v


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and check a GGUF file's metadata and tensor table (tensor data stays memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    _header(path)
    size = path.stat().st_size
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
        meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{path}: tensor {t.name} runs past the end of the file (truncated GGUF); "
                                      "download or export it again")
            tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, t.tensor_type,
                                         tuple(int(d) for d in reversed(t.shape.tolist())), t.data)
    except CheckpointError:
        raise
    except Exception as e:  # the reader raises ValueError / IndexError / struct errors on damaged files
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: cannot be read as GGUF, it may be truncated or corrupt ({why})") from None
    return GGUFFile(path, meta, tensors)
