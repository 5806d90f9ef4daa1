"""The sandbox's non-root path (issue 18), run for real: lmstack started by an unprivileged user.

As root, ``lmstack.eval.sandbox`` hands the program to ``setpriv`` inside bubblewrap; as any other user it asks
bubblewrap for a user namespace that maps the caller to 65534. The other sandbox tests run as root, so this
path was only ever checked by hand. Here each test drops to uid/gid 65534 in a child process (``setpriv
--reuid=65534 --regid=65534 --clear-groups``; directly when the tests themselves do not run as root), with a
copy of the ``lmstack`` package and a Python that this user can read, and checks there that

* isolation still holds: every escape of ``tests/test_hardening_sandbox.py`` (host secrets and project files,
  writes outside the private /tmp (even into a world-writable host directory), a shell, a fork bomb, the PID
  namespace, an exit before the checks, a forged verdict, ``ctypes``, ignored signals, a daemon, the network)
  plus a nested user namespace is contained;
* without user namespaces (a child whose own namespace forbids more of them) or without bubblewrap it refuses
  with the documented one-line message, and ``LMSTACK_ALLOW_UNSANDBOXED=1`` runs the program with the rlimits
  and the nonce rule.

Only the tests that need bubblewrap skip without it; the refusal without bubblewrap always runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
CALLER = NOBODY if os.geteuid() == 0 else os.geteuid()  # the uid the child runs as (the tests' own when not root)
HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap (bwrap) is not installed")

# runs as 65534: each (name, program, run_code kwargs) through the sandbox; one JSON line of results
CHILD = r"""
import json, os, sys
from lmstack.eval import sandbox as S
cases = json.loads(sys.stdin.read())
out = {"uid": os.getuid(), "euid": os.geteuid(), "iso": [S.isolation().kind, S.isolation().reason], "runs": {}}
for name, code, kw in cases:
    try:
        r = S.run_code(code, **kw)
        out["runs"][name] = {"passed": r.passed, "status": r.status, "stdout": r.stdout, "stderr": r.stderr,
                             "seconds": r.seconds}
    except S.SandboxUnavailable as e:
        out["runs"][name] = {"refused": str(e)}
try:
    S.run_many(["print(1)"])
    out["run_many"] = "ran"
except S.SandboxUnavailable as e:
    out["run_many"] = str(e)
print("RESULT " + json.dumps(out))
"""


class AsNobody:
    """Runs CHILD as uid/gid 65534 with a world-readable copy of lmstack and a Python that user can execute."""

    def __init__(self, root: Path):
        self.root = root
        self.pkg = root / "pkg"
        shutil.copytree(ROOT / "lmstack", self.pkg / "lmstack", ignore=shutil.ignore_patterns("__pycache__"))
        for d, dirs, files in os.walk(root):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        self.drop = ([] if os.geteuid() != 0 else
                     [shutil.which("setpriv") or "/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                      "--clear-groups", "--"])
        # the first interpreter whose install 65534 can read (bubblewrap binds it into the sandbox as that user;
        # a Python under root's 0700 home makes the non-root path refuse: "Can't find source path")
        self.python = None
        probe = "import os, sys\nopen(os.path.realpath(sys.executable), 'rb').read(1)\nimport lmstack.eval.sandbox"
        for py in (os.path.realpath(sys.executable), "/usr/bin/python3"):
            if os.path.exists(py) and self._call([py, "-c", probe]).returncode == 0:
                self.python = py
                break
        assert self.python, "no Python interpreter that uid 65534 can run lmstack.eval.sandbox with"

    def _call(self, cmd, wrap=(), env=None, stdin=""):
        e = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.pkg), "HOME": "/tmp", "LANG": "C.UTF-8", **(env or {})}
        return subprocess.run([*self.drop, *wrap, *cmd], env=e, cwd="/tmp", input=stdin, capture_output=True,
                              text=True, timeout=300)

    def run(self, cases, wrap=(), env=None) -> dict:
        p = self._call([self.python, "-c", CHILD], wrap, env, json.dumps(cases))
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        assert p.returncode == 0 and line, p.stdout + p.stderr
        return json.loads(line[0][7:])


@pytest.fixture(scope="module")
def nobody():
    root = Path(tempfile.mkdtemp(prefix="lmstack-nonroot-"))  # not under pytest's 0700 tmp tree
    try:
        yield AsNobody(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ escapes on the user-namespace path
@pytest.fixture(scope="module")
def escapes(nobody):
    """Every escape program run once as 65534 through the real sandbox; the host-side evidence beside it."""
    if not HAVE_BWRAP:
        pytest.skip("bubblewrap (bwrap) is not installed")
    drop = nobody.root / "dropbox"  # a world-writable, world-readable host directory: only namespaces protect it
    drop.mkdir()
    os.chmod(drop, 0o777)
    (drop / "secret.txt").write_text("s3cret")
    os.chmod(drop / "secret.txt", 0o644)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    marker = f"lmstack-daemon-{uuid.uuid4().hex}"
    targets = ["/etc/shadow", "/etc/passwd", str(ROOT / "pyproject.toml"), str(drop / "secret.txt"),
               str(nobody.pkg / "lmstack" / "errors.py"), "/root", "/home", "/work"]
    writes = [str(drop / "w.txt"), f"/tmp/lmstack-escape-{uuid.uuid4().hex}", str(nobody.pkg / "x.py"),
              sys.base_prefix + "/x", "/usr/x"]
    cases = [
        ("identity", "import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n"
                     "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])\n", {}),
        ("read", "import os\nseen = []\n"
                 f"for p in {targets!r}:\n"
                 "    try:\n        seen.append((p, open(p).read(20) if os.path.isfile(p) else os.listdir(p)))\n"
                 "    except OSError:\n        pass\nprint(seen)\n", {}),
        ("write", "wrote = []\n"
                  f"for p in {writes!r}:\n"
                  "    try:\n        open(p, 'w').write('x')\n        wrote.append(p)\n    except OSError:\n        pass\n"
                  "print(wrote)\n", {}),
        ("shell", "import subprocess\nprint(subprocess.run(['/bin/sh', '-c', "
                  f"'id -u; touch {drop}/shell; echo rc=$?'], capture_output=True, text=True).stdout)", {}),
        ("fork_bomb", "import subprocess\nps = []\ntry:\n    for _ in range(300):\n"
                      "        ps.append(subprocess.Popen(['sleep', '30']))\nfinally:\n    print(len(ps))\n",
         {"timeout": 20}),
        ("pids", "import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))\n", {}),
        ("early_exit", "def f(x):\n    return x\nimport os\nos._exit(0)\ndef check(c):\n    assert c(1) == 2\n"
                       "check(f)\n", {}),
        ("forge", "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32 + b' passed\\n')\n"
                  "    except OSError:\n        pass\nos._exit(0)\n", {}),
        ("ctypes", "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.setuid(0), libc.setgid(0))\n", {}),
        ("userns", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"  # unshare(CLONE_NEWUSER)
                   "rc = libc.unshare(0x10000000)\nprint('unshared' if rc == 0 else f'refused {ctypes.get_errno()}')\n",
         {}),
        ("signals", "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                    "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n", {"timeout": 1.0}),
        ("daemon", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                   f"        os.execv('/bin/sleep', ['sleep', '60', '{marker}'])\n    os._exit(0)\n"
                   "time.sleep(0.3)\nprint('parent done')\n", {"timeout": 5}),
        ("network", "import _socket\ns = _socket.socket()\ns.settimeout(2)\ntry:\n"
                    f"    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
                    "except OSError as e:\n    print('refused', e)\n", {}),
        ("fsize", "open('big', 'wb').write(b'x' * (64 * 1024 * 1024))", {}),
    ]
    t0 = time.perf_counter()
    out = nobody.run(cases)
    out["wall"] = time.perf_counter() - t0
    time.sleep(0.3)
    out["daemons"] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out["daemons"].append(pid)
        except OSError:
            continue
    try:
        listener.accept()
        out["accepted"] = True
    except BlockingIOError:
        out["accepted"] = False
    listener.close()
    out["drop"] = sorted(p.name for p in drop.iterdir())
    out["writes"] = writes
    return out


@needs_bwrap
def test_non_root_caller_gets_the_user_namespace_sandbox(escapes):
    assert escapes["uid"] == CALLER != 0 and escapes["euid"] == CALLER  # the caller really is unprivileged
    assert escapes["iso"] == ["bwrap", ""]
    r = escapes["runs"]["identity"]
    assert r["passed"], r["stderr"]
    ids, caps = r["stdout"].split("\n")[:2]
    assert ids == "65534 65534 65534 [65534]" or ids == "65534 65534 65534 []"
    assert int(caps, 16) == 0


@needs_bwrap
def test_non_root_no_host_files_readable_or_writable(escapes):
    r = escapes["runs"]["read"]
    assert r["passed"], r["stderr"]
    assert r["stdout"].strip() == "[]" and "s3cret" not in r["stdout"]  # world-readable on the host, yet unseen
    w = escapes["runs"]["write"]
    # only the /tmp path was writable: the sandbox's private tmpfs, which the host never sees
    assert w["passed"] and w["stdout"].strip() == repr([escapes["writes"][1]]), w
    assert escapes["drop"] == ["secret.txt"]  # the 0777 host directory got nothing (program or shell)
    assert not any(Path(p).exists() for p in escapes["writes"])
    s = escapes["runs"]["shell"]
    assert s["passed"] and s["stdout"].split()[0] == "65534" and "rc=1" in s["stdout"], s


@needs_bwrap
def test_non_root_process_limits_and_namespaces_hold(escapes):
    from lmstack.eval import sandbox as S

    fb = escapes["runs"]["fork_bomb"]
    assert fb["status"] == "failed" and int(fb["stdout"].split()[-1]) < S.MAX_PROCESSES, fb
    assert int(escapes["runs"]["pids"]["stdout"]) <= 3
    assert escapes["runs"]["userns"]["stdout"].startswith("refused"), escapes["runs"]["userns"]
    assert escapes["runs"]["ctypes"]["stdout"].split() == ["-1", "-1"]
    assert escapes["runs"]["signals"]["status"] == "timeout" and escapes["runs"]["signals"]["seconds"] < 5
    assert escapes["runs"]["daemon"]["passed"] and not escapes["daemons"]
    net = escapes["runs"]["network"]
    assert net["stdout"].startswith("refused") and not escapes["accepted"], net
    f = escapes["runs"]["fsize"]
    assert f["status"] == "failed" and "File too large" in f["stderr"]


@needs_bwrap
def test_non_root_pass_needs_the_harness(escapes):
    assert escapes["runs"]["early_exit"]["status"] == "failed"
    assert escapes["runs"]["forge"]["status"] == "failed"


# ------------------------------------------------------------------ refusing, and the opt-in
OPT_IN_CASES = [
    ("plain", "print(1)", {}),
    ("early_exit", "import os\nos._exit(0)", {}),
    ("limits", "import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC), "
               "resource.getrlimit(resource.RLIMIT_FSIZE))", {}),
]


def _check_refused_then_opt_in(nobody, reason: str, wrap=(), env=None):
    from lmstack.eval import sandbox as S

    out = nobody.run(OPT_IN_CASES, wrap=wrap, env=env)
    assert out["uid"] == (NOBODY if wrap else CALLER) != 0 and out["iso"][0] == "none" and reason in out["iso"][1]
    for name, _, _ in OPT_IN_CASES:
        msg = out["runs"][name]["refused"]
        assert msg.startswith("cannot run generated code safely: ") and reason in msg and "\n" not in msg
        assert f"{S.ALLOW_ENV}=1" in msg
    assert out["run_many"] == out["runs"]["plain"]["refused"]  # nothing ran
    opt = nobody.run(OPT_IN_CASES, wrap=wrap, env={**(env or {}), S.ALLOW_ENV: "1"})
    assert opt["runs"]["plain"]["passed"] and opt["runs"]["plain"]["stdout"] == "1\n"
    assert opt["runs"]["early_exit"]["status"] == "failed"  # the nonce rule still holds
    lim = opt["runs"]["limits"]
    assert lim["passed"] and lim["stdout"].strip() == f"({S.MAX_PROCESSES}, {S.MAX_PROCESSES}) " \
                                                      f"({S.MAX_FILE_BYTES}, {S.MAX_FILE_BYTES})"
    assert opt["run_many"] == "ran"
    return msg


@needs_bwrap
def test_non_root_without_user_namespaces_refuses_then_opt_in_runs(nobody):
    """A caller whose user namespace allows no further ones (bubblewrap's own --disable-userns), as in a
    container or a kernel that forbids unprivileged user namespaces."""
    bwrap = shutil.which("bwrap")
    wrap = [bwrap, "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--"]
    msg = _check_refused_then_opt_in(nobody, "bubblewrap cannot start a sandbox here", wrap=wrap)
    assert "user namespaces" in msg  # says what to change, not "install bubblewrap"


def test_non_root_without_bubblewrap_refuses_then_opt_in_runs(nobody, tmp_path):
    """Runs whether bubblewrap is installed or not: the child's PATH has no bwrap."""
    empty = Path(tempfile.mkdtemp(prefix="lmstack-nobwrap-"))
    os.chmod(empty, 0o755)
    try:
        msg = _check_refused_then_opt_in(nobody, "bubblewrap (bwrap) is not installed", env={"PATH": str(empty)})
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    assert "apt-get install bubblewrap" in msg
