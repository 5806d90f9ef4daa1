"""Small shared helpers: atomic writes, device/dtype choice, seeding, progress bars, hashing.

``lmstack.utils.device`` imports torch; it is loaded lazily so text-only code (data, tokenizer) stays light.
"""

from __future__ import annotations

from typing import Any

from lmstack.utils.io import atomic_dir, atomic_write, atomic_write_json, atomic_write_text, file_sha256, read_json
from lmstack.utils.progress import progress

_LAZY = {"resolve_device", "resolve_dtype", "seed_everything"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lmstack.utils import device

        return getattr(device, name)
    raise AttributeError(name)


__all__ = [
    "atomic_write", "atomic_write_json", "atomic_write_text", "atomic_dir", "file_sha256", "read_json",
    "resolve_device", "resolve_dtype", "seed_everything", "progress",
]
