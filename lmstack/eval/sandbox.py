"""Run untrusted generated code: a subprocess per sample with a timeout, memory/CPU/file limits, no network
and a fresh temporary directory. A crash, hang or resource blow-up is a failed sample, never a failed run.

Isolation layers (the approach of OpenAI's human-eval ``execution.py`` and bigcode-evaluation-harness,
moved out of process):
- ``unshare --net --map-root-user --pid --fork --kill-child`` (empty network namespace; own PID namespace, so
  killing the sample kills every process it started) when the kernel allows it;
- always, a prelude that replaces ``socket`` connection functions with ones that raise, so code that tries to
  reach the network fails even where namespaces are unavailable;
- ``setrlimit``: address space (``memory_mb``), CPU seconds, file size; a new session so the whole process
  group is killed on timeout;
- ``python -I`` (isolated: no user site, no PYTHON* env vars), an empty environment and a temporary working
  directory removed afterwards.
This is a best-effort sandbox for evaluation, not a security boundary against a determined attacker.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

_PRELUDE = r'''
import socket as _s
def _blocked(*a, **k):
    raise OSError("network access is disabled in the lmstack sandbox")
for _name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_server",
              "socketpair", "fromfd"):
    setattr(_s, _name, _blocked)
class _NoSocket(_s.socket):
    def __init__(self, *a, **k):
        _blocked()
_s.socket = _NoSocket
del _s, _name, _NoSocket
'''


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


_NS_FLAGS = (["--net", "--map-root-user", "--pid", "--fork", "--kill-child"], ["--net", "--map-root-user"])


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that works here (probed once), or () when none does.

    Preferred: new network namespace (no interfaces but a down loopback) and new PID namespace whose init is
    killed with ``unshare``, which takes every descendant with it, even ones that called setsid()."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for flags in _NS_FLAGS:
        try:
            r = subprocess.run([exe, *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return (exe, *flags)
    return ()


def network_namespace_available() -> bool:
    return bool(namespace_prefix())


def _limits(memory_mb: int, cpu_seconds: int) -> None:  # runs in the child before exec
    import resource

    os.setsid()
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_code(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 4000,
             isolate_network: bool = True) -> SandboxResult:
    """Run ``code`` (a full Python program) in the sandbox; it passes when it exits with status 0."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmstack-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + "\n" + code)
        cmd = [sys.executable, "-I", "-B", path]
        if isolate_network:
            cmd = list(namespace_prefix()) + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cpu = max(1, int(timeout) + 1)
        try:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, preexec_fn=lambda: _limits(memory_mb, cpu))
        except OSError as e:
            return SandboxResult(False, "error", None, "", f"cannot start sandbox: {e}", 0.0)
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:  # a detached grandchild (no PID namespace) may still hold the pipes open: do not wait for it
                out, err = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                for pipe in (proc.stdout, proc.stderr):
                    pipe.close()
                proc.wait()
                out, err = b"", b"(output lost: a detached process kept the pipes open)"
            status = "timeout"
        secs = time.perf_counter() - start
    return SandboxResult(status == "passed", status, proc.returncode,
                         out.decode("utf-8", "replace")[-max_output:], err.decode("utf-8", "replace")[-max_output:],
                         secs)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_many(programs: list[str], *, workers: int = 2, on_done=None, **kw) -> list[SandboxResult]:
    """Run programs concurrently (threads each waiting on one subprocess), results in input order.

    ``on_done()`` is called after each program finishes (progress bars)."""
    if not programs:
        return []

    def one(p: str) -> SandboxResult:
        r = run_code(p, **kw)
        if on_done is not None:
            on_done()
        return r

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(one, programs))
