"""Small shared helpers: atomic writes, device/dtype choice, seeding, progress bars, hashing."""

from lmstack.utils.io import atomic_write, atomic_write_json, atomic_write_text, atomic_dir, file_sha256, read_json
from lmstack.utils.device import resolve_device, resolve_dtype, seed_everything
from lmstack.utils.progress import progress

__all__ = [
    "atomic_write", "atomic_write_json", "atomic_write_text", "atomic_dir", "file_sha256", "read_json",
    "resolve_device", "resolve_dtype", "seed_everything", "progress",
]
