"""Run untrusted generated code: one sandboxed process per program. Generated code is untrusted code: it runs
as an unprivileged user, sees only the Python install and a private temporary directory, has no network, is
bounded by rlimits and a wall-clock kill, and passes only when the harness saw the program run to its end.

Isolation (bubblewrap, https://github.com/containers/bubblewrap, the tool Flatpak builds on; the per-sample
shape of OpenAI's human-eval ``execution.py`` and bigcode-evaluation-harness, moved out of process):

- **mount namespace** with a minimal read-only view: ``/usr`` (and the ``/bin``, ``/lib*`` links), the Python
  install running lmstack, a fresh ``/proc`` and ``/dev``, the program at ``/sandbox/program.py``; the only
  writable path is ``/tmp``, a private 64 MiB tmpfs (the host's disk cannot be filled). No ``/etc``,
  ``/home``, ``/root``, project files or host ``/tmp``;
- **unprivileged user** 65534 (nobody): as root, bubblewrap keeps only CAP_SETUID/SETGID for ``setpriv``,
  which drops to 65534 with no capabilities and ``no_new_privs`` (a real host uid, so RLIMIT_NPROC holds --
  the kernel exempts uid 0 from it); as another user, a user namespace maps the caller to 65534;
- **PID, network, IPC, UTS namespaces**: no interface but a down loopback; the sandbox's init is killed with
  bubblewrap (``--die-with-parent``), which takes every descendant with it, daemons included;
  ``--new-session`` so the program cannot push input to the caller's terminal (TIOCSTI);
- **rlimits** set by the harness before the program runs: address space, CPU seconds, file size, open files,
  processes (RLIMIT_NPROC), no core dumps; a wall-clock timeout kills bubblewrap's process group;
- **a pass needs the harness's word**: the harness reads a random nonce from stdin, runs the program with
  ``exec`` and, only when it ran to its last line (the ``check(...)`` call), writes the nonce to a pipe that
  only the caller reads. ``os._exit(0)``, ``sys.exit(0)``, a killed harness or a ``SystemExit`` before the
  checks are failures whatever the exit status.

Without bubblewrap (or where the kernel refuses namespaces) nothing untrusted runs: :func:`run_code` raises
:class:`SandboxUnavailable` saying how to install it, unless ``LMSTACK_ALLOW_UNSANDBOXED=1`` opts in to a
subprocess with only the rlimits, the socket guard and the nonce rule.

Limits of this design: the checks run in the same interpreter as the program, so code written to attack the
harness (reading the nonce from the harness's frame) can still fake a pass -- as in human-eval. The sandbox
protects the host from the code, not the score from an adversarial model.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import LmstackError

ALLOW_ENV = "LMSTACK_ALLOW_UNSANDBOXED"
SANDBOX_UID = 65534  # nobody
MAX_PROCESSES = 64  # RLIMIT_NPROC inside the sandbox (threads count)
MAX_OPEN_FILES = 256
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_TMP_BYTES = 64 * 1024 * 1024  # the private /tmp is a tmpfs of this size (not the host's disk)

# Runs inside the sandbox as `python -I -B -c _HARNESS PROGRAM RESULT_FD MEMORY_MB CPU_S NPROC NOFILE FSIZE`.
_HARNESS = r'''
import os, sys
def _flush():
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
def _lmstack_harness():
    import builtins, resource, socket, traceback
    path, fd = sys.argv[1], int(sys.argv[2])
    mem, cpu, nproc, nofile, fsize = (int(x) for x in sys.argv[3:8])
    nonce = b""
    while len(nonce) < 32:
        chunk = os.read(0, 32 - len(nonce))
        if not chunk:
            break
        nonce += chunk
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.set_inheritable(fd, False)
    for lim, v in ((resource.RLIMIT_AS, mem * 1024 * 1024), (resource.RLIMIT_CPU, cpu),
                   (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                   (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (v, v))
    def blocked(*a, **k):
        raise OSError("network access is disabled in the lmstack sandbox")
    for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_server",
                 "socketpair", "fromfd"):
        setattr(socket, name, blocked)
    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            blocked()
    socket.socket = NoSocket
    sys.argv = [path]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    try:
        exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": builtins})
    except SystemExit as e:
        sys.stderr.write(f"lmstack sandbox: the program exited (SystemExit({e.code!r})) before its end; "
                         "a sample passes only when its checks run to completion\n")
        _flush()
        os._exit(1)
    except BaseException:
        traceback.print_exc()
        _flush()
        os._exit(1)
    _flush()
    os.write(fd, nonce + b" passed\n")
    os._exit(0)
_lmstack_harness()
'''


class SandboxUnavailable(LmstackError):
    """No isolation is available here, and running generated code without it was not opted in to."""


@dataclass
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Isolation:
    kind: str  # "bwrap" | "none"
    reason: str  # why "none" (empty for bwrap)


def _python() -> tuple[str, str]:
    """(interpreter, install prefix) to run programs with: the base install, not the virtual environment."""
    exe = os.path.realpath(sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def _bwrap_cmd(bwrap: str, tmp: str, share_net: bool) -> list[str]:
    exe, prefix = _python()
    cmd = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--ro-bind", "/usr", "/usr"]
    if not share_net:
        cmd.append("--unshare-net")
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    made: set[str] = set()
    for p in sorted({prefix, os.path.dirname(os.path.dirname(exe))}):
        if (p + "/").startswith("/usr/"):
            continue
        parents = [str(a) for a in reversed(Path(p).parents) if str(a) != "/"]
        for a in parents:  # traversable by the sandbox user even where the host's is not (/root is 0700)
            if a not in made:
                made.add(a)
                cmd += ["--perms", "0755", "--dir", a]
        cmd += ["--ro-bind", p, p]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", tmp, "/sandbox",
            "--perms", "1777", "--size", str(MAX_TMP_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp",
            "--hostname", "sandbox"]
    if os.geteuid() == 0:
        cmd += ["--cap-add", "CAP_SETUID,CAP_SETGID", "--", shutil.which("setpriv") or "/usr/bin/setpriv",
                f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs"]
    else:
        cmd += ["--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--"]
    return cmd


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once: does a bubblewrap sandbox start here and run a program as the unprivileged user?"""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Isolation("none", "bubblewrap (bwrap) is not installed")
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return Isolation("none", "setpriv (util-linux) is not installed")
    r = _run("import os\nassert os.getuid() == %d\n" % SANDBOX_UID, "bwrap", timeout=30.0, memory_mb=512,
             max_output=2000, share_net=False)
    if not r.passed:
        why = (r.stderr.strip().splitlines() or [r.status])[-1]
        return Isolation("none", f"bubblewrap cannot start a sandbox here ({why[:200]})")
    return Isolation("bwrap", "")


def require_isolation() -> str:
    """The isolation to use: ``"bwrap"``, or ``"none"`` only when ``LMSTACK_ALLOW_UNSANDBOXED=1``."""
    iso = isolation()
    if iso.kind != "none":
        return iso.kind
    if os.environ.get(ALLOW_ENV) == "1":
        return "none"
    if iso.reason.startswith("bubblewrap cannot start"):  # installed, but the kernel or the paths refuse it
        fix = ("as a user other than root bubblewrap needs unprivileged user namespaces (sysctl "
               "user.max_user_namespaces > 0; kernel.unprivileged_userns_clone=1 where it exists; a container's "
               "seccomp profile that allows them) and read access to the Python install")
    elif "setpriv" in iso.reason:
        fix = "install it (`apt-get install util-linux`)"
    else:
        fix = "install it (`make sandbox`, or `apt-get install bubblewrap`)"
    raise SandboxUnavailable(f"cannot run generated code safely: {iso.reason}; {fix}, or set {ALLOW_ENV}=1 to run "
                             f"it with only rlimits (not isolated from this machine)")


def run_code(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 4000,
             isolate_network: bool = True) -> SandboxResult:
    """Run ``code`` (a full Python program) in the sandbox; it passes when the harness saw it run to its end
    within the limits. Raises :class:`SandboxUnavailable` when no isolation is available (see module doc)."""
    return _run(code, require_isolation(), timeout=timeout, memory_mb=memory_mb, max_output=max_output,
                share_net=not isolate_network)


def _run(code: str, kind: str, *, timeout: float, memory_mb: int, max_output: int, share_net: bool
         ) -> SandboxResult:
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="lmstack-sandbox-")
    r_fd = w_fd = -1
    try:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        exe, _ = _python()
        cpu = max(1, int(timeout) + 1)
        if kind == "bwrap":
            os.chmod(tmp, 0o755)  # read-only inside (/sandbox); the program writes to its own tmpfs /tmp
            prefix, inner = _bwrap_cmd(shutil.which("bwrap") or "bwrap", tmp, share_net), "/sandbox/program.py"
            cwd = None
        else:
            prefix, inner, cwd = [], path, tmp
        home = "/tmp" if kind == "bwrap" else tmp
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        r_fd, w_fd = os.pipe()
        cmd = [*prefix, exe, "-I", "-B", "-c", _HARNESS, inner, str(w_fd), str(memory_mb), str(cpu),
               str(MAX_PROCESSES), str(MAX_OPEN_FILES), str(MAX_FILE_BYTES)]
        nonce = secrets.token_hex(16).encode()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(w_fd,), start_new_session=True,
                                    preexec_fn=lambda: _outer_limits(cpu))
        except OSError as e:
            return SandboxResult(False, "error", None, "", f"cannot start sandbox: {e}", 0.0)
        finally:
            os.close(w_fd)
            w_fd = -1
        try:
            out, err = proc.communicate(input=nonce, timeout=timeout)
            status = None
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
        os.set_blocking(r_fd, False)
        try:
            verdict = os.read(r_fd, 256)
        except BlockingIOError:
            verdict = b""
        if status is None:
            status = "passed" if proc.returncode == 0 and verdict == nonce + b" passed\n" else "failed"
        secs = time.perf_counter() - start
    finally:
        for fd in (r_fd, w_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
    return SandboxResult(status == "passed", status, proc.returncode,
                         out.decode("utf-8", "replace")[-max_output:], err.decode("utf-8", "replace")[-max_output:],
                         secs)


def _outer_limits(cpu_seconds: int) -> None:  # runs in the child before exec (bubblewrap or the fallback)
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds + 1, cpu_seconds + 2))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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
    require_isolation()  # refuse before running anything

    def one(p: str) -> SandboxResult:
        r = run_code(p, **kw)
        if on_done is not None:
            on_done()
        return r

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(one, programs))
