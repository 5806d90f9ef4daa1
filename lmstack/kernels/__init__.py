"""Optional compiled kernels, built from source on first use and cached.

``cpu_decode.cpp`` runs a whole decode step of the Transformer (every layer and ``lm_head``) for a batch of
sequences with one new token each, over the serving engine's paged KV pool, in fp32 on the CPU. The serving
engine uses it for decode-only steps at small batch when it is available and falls back to the eager path
(the same math, tested equal) otherwise. See docs/generation.md ("CPU decode kernel").

It is compiled with the system C++ compiler through :func:`torch.utils.cpp_extension.load` the first time a
CPU fp32 engine starts (~20-40 s, once per machine / torch version / source change; cached under
``$LMSTACK_KERNEL_CACHE`` or ``~/.cache/lmstack/kernels``, the name carrying a hash of the source, flags,
torch version and CPU). ``LMSTACK_KERNELS`` controls it:

- ``auto`` (default): build and use it when possible; if the build fails (no compiler), warn once
  (:class:`KernelUnavailableWarning`, through :mod:`warnings`) and run eager;
- ``0`` / ``off``: never build, always eager;
- ``1`` / ``on``: require it (a failed build raises :class:`KernelError`).

The library does not print (docs/design.md): the one-time build is announced on the ``lmstack.kernels`` logger at
WARNING, so it shows (on stderr through logging's last-resort handler) where the application configured no
logging, and a failed build is a :mod:`warnings` warning the caller may filter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from lmstack.errors import LmstackError

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
_lock = threading.Lock()
_loaded: dict[str, bool] = {}
_error: dict[str, str] = {}
log = logging.getLogger("lmstack.kernels")


class KernelError(LmstackError):
    """LMSTACK_KERNELS=1 but the compiled kernels could not be built or loaded."""


class KernelUnavailableWarning(RuntimeWarning):
    """LMSTACK_KERNELS=auto and the kernel could not be built: the eager path runs instead (slower at small batch)."""


def mode() -> str:
    m = os.environ.get("LMSTACK_KERNELS", "auto").strip().lower()
    if m in ("0", "off", "false", "no"):
        return "off"
    if m in ("1", "on", "true", "yes", "require"):
        return "on"
    return "auto"


def _cpu_fingerprint() -> str:
    """The build uses -march=native: a cached library must not be reused on a different CPU."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        for line in info.splitlines():
            if line.startswith(("model name", "flags")):
                text += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return text


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-std=c++20"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
    return flags


def cache_dir() -> Path:
    """Where built kernels live: $LMSTACK_KERNEL_CACHE, else $XDG_CACHE_HOME/lmstack/kernels (~/.cache/...)."""
    env = os.environ.get("LMSTACK_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmstack" / "kernels"


def library_path() -> Path:
    """The built library: its name hashes the source, the flags, the torch version and the CPU."""
    h = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(_flags()).encode()
                       + _cpu_fingerprint().encode()).hexdigest()[:12]
    name = f"lmstack_cpu_decode_{h}"
    return cache_dir() / name / f"{name}.so"


def load_cpu_decode() -> bool:
    """Build (once) and load the CPU decode kernel; True when ``torch.ops.lmstack_cpu.decode_step`` exists."""
    m = mode()
    if m == "off":
        return False
    with _lock:
        if "cpu" in _loaded:
            if not _loaded["cpu"] and m == "on":
                raise KernelError(f"the CPU decode kernel could not be built: {_error.get('cpu')}")
            return _loaded["cpu"]
        ok, err = False, ""
        try:
            flags = _flags()
            lib = library_path()
            build_dir, name = lib.parent, lib.stem
            cached = False
            if lib.is_file():  # built before: load it directly (importing cpp_extension + ninja costs ~2 s)
                try:
                    torch.ops.load_library(str(lib))
                    cached = True
                except (OSError, RuntimeError):  # e.g. a link cut short: rebuild below
                    lib.unlink(missing_ok=True)
            if not cached:
                from torch.utils.cpp_extension import load

                build_dir.mkdir(parents=True, exist_ok=True)
                log.warning("building the CPU decode kernel (first use on this machine, ~20-40 s) in %s", build_dir)
                load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                     build_directory=str(build_dir), is_python_module=False, verbose=False)
            ok = hasattr(torch.ops.lmstack_cpu, "decode_step")
            if not ok:
                err = "the library loaded but registered no lmstack_cpu::decode_step"
        except Exception as e:  # noqa: BLE001 - any build failure means "use the eager path"
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        _loaded["cpu"] = ok
        if not ok:
            _error["cpu"] = err
            if m == "on":
                raise KernelError(f"the CPU decode kernel could not be built: {err} (needs a C++20 compiler and "
                                  "ninja; set LMSTACK_KERNELS=auto to fall back to the eager path)")
            warnings.warn(f"CPU decode kernel unavailable ({err}); using the eager path, which is slower at small "
                          "batch. Install a C++ compiler (g++) or set LMSTACK_KERNELS=0 to silence this.",
                          KernelUnavailableWarning, stacklevel=2)
        return ok
