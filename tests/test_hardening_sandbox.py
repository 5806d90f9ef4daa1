"""The code sandbox is one: each escape a hostile (or careless) generated program tries is contained.

Every test runs a program that would succeed on the host (the control runs the same idea here when it is safe)
and checks the sandboxed run failed, or that its effect never reached the host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lmstack.eval import sandbox as S
from lmstack.eval.sandbox import SandboxUnavailable, run_code

ROOT = Path(__file__).resolve().parents[1]


def test_isolation_is_available_here():
    # make test installs bubblewrap (`make sandbox`); without it every test below would test the refusal only
    assert S.isolation().kind == "bwrap", S.isolation().reason


def test_runs_as_an_unprivileged_user_without_capabilities():
    r = run_code("import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n"
                 "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])\n"
                 "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0])")
    assert r.passed, r.stderr
    ids, caps, nnp = r.stdout.split("\n")[:3]
    assert ids == "65534 65534 65534 []" and int(caps, 16) == 0 and nnp == "1"


def test_cannot_read_host_secrets_or_project_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    targets = ["/etc/shadow", "/etc/passwd", str(ROOT / "pyproject.toml"), str(secret), "/root/.ssh", "/home", "/work"]
    assert Path(targets[2]).is_file() and secret.read_text() == "s3cret"  # readable on the host
    code = ("import os\nseen = []\n"
            f"for p in {targets!r}:\n"
            "    try:\n        seen.append((p, open(p).read(20) if os.path.isfile(p) else os.listdir(p)))\n"
            "    except OSError as e:\n        pass\n"
            "print(seen)\nassert not seen\n")
    r = run_code(code)
    assert r.passed, r.stdout + r.stderr
    assert "s3cret" not in r.stdout


def test_host_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("LMSTACK_TEST_SECRET_TOKEN", "tok-123")
    r = run_code("import os\nprint(sorted(os.environ))\n"
                 "for p in filter(str.isdigit, os.listdir('/proc')):\n"
                 "    try:\n        print(open(f'/proc/{p}/environ', 'rb').read())\n"
                 "    except OSError:\n        pass\n"
                 "assert 'LMSTACK_TEST_SECRET_TOKEN' not in os.environ")
    assert r.passed, r.stderr
    assert "tok-123" not in r.stdout


def test_nothing_outside_the_private_tmp_is_writable(tmp_path):
    host_tmp = Path("/tmp") / f"lmstack-escape-{uuid.uuid4().hex}"
    project = ROOT / f"escape-{uuid.uuid4().hex}.txt"
    out = tmp_path / "out.txt"
    code = ("import os\nwrote = []\n"
            f"for p in {[str(host_tmp), str(project), str(out), '/usr/x', sys.base_prefix + '/x']!r}:\n"
            "    try:\n        open(p, 'w').write('x')\n        wrote.append(p)\n"
            "    except OSError:\n        pass\n"
            "print(wrote)\n")
    r = run_code(code)
    assert r.passed, r.stderr
    for p in (project, out, Path("/usr/x"), Path(sys.base_prefix) / "x"):
        assert not p.exists()
    assert not host_tmp.exists()  # a write to /tmp lands in the private directory, removed afterwards


def test_a_shell_runs_confined():
    marker = ROOT / f"shell-{uuid.uuid4().hex}"
    r = run_code("import subprocess\n"
                 f"print(subprocess.run(['/bin/sh', '-c', 'id -u; touch {marker}; echo rc=$?'], "
                 "capture_output=True, text=True).stdout)")
    assert r.passed, r.stderr
    assert r.stdout.split()[0] == "65534" and "rc=1" in r.stdout
    assert not marker.exists()


def test_fork_bomb_hits_the_process_limit():
    code = ("import subprocess, time\nps = []\n"
            "try:\n    for _ in range(300):\n        ps.append(subprocess.Popen(['sleep', '30']))\n"
            "finally:\n    print(len(ps))\n")
    t0 = time.perf_counter()
    r = run_code(code, timeout=20)
    assert not r.passed and r.status == "failed"
    assert int(r.stdout.split()[-1]) < S.MAX_PROCESSES
    assert "Resource temporarily unavailable" in r.stderr or "BlockingIOError" in r.stderr
    assert time.perf_counter() - t0 < 20  # the sleepers died with the sandbox, nothing waited for them


def test_pid_namespace_hides_host_processes():
    host_pids = [p for p in os.listdir("/proc") if p.isdigit()]
    assert len(host_pids) > 5
    r = run_code("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nprint(len(pids))\n"
                 "import signal\nfor p in pids:\n    try:\n        os.kill(int(p), 0)\n"
                 "    except OSError:\n        pass\n")
    assert r.passed, r.stderr
    assert int(r.stdout) <= 3  # the sandbox's init and the program


@pytest.mark.parametrize("early_exit", [
    "import os\nos._exit(0)",
    "import sys\nsys.exit(0)",
    "raise SystemExit",
    "import ctypes\nctypes.CDLL(None)._exit(0)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
])
def test_exiting_before_the_checks_is_not_a_pass(early_exit):
    prog = f"def f(x):\n    return x + 1\n{early_exit}\n\ndef check(c):\n    assert c(1) == 3\n\ncheck(f)\n"
    plain = subprocess.run([sys.executable, "-c", prog], capture_output=True)
    if "SIGKILL" not in early_exit:
        assert plain.returncode == 0  # the exit status alone would have said "passed"
    r = run_code(prog)
    assert r.status == "failed" and not r.passed


def test_forging_the_harness_result_fails():
    # writes a plausible verdict to every descriptor the harness might use, then exits 0
    prog = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32 + b' passed\\n')\n"
            "    except OSError:\n        pass\nos._exit(0)\n")
    assert run_code(prog).status == "failed"


def test_ctypes_cannot_regain_privileges():
    r = run_code("import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.setuid(0), libc.setgid(0))\n"
                 "import os\nassert os.getuid() == 65534")
    assert r.passed, r.stderr
    assert r.stdout.split() == ["-1", "-1"]


def test_ignoring_signals_does_not_outlive_the_timeout():
    prog = ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):\n"
            "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n")
    t0 = time.perf_counter()
    r = run_code(prog, timeout=1.0)
    assert r.status == "timeout" and time.perf_counter() - t0 < 5


def test_a_daemon_does_not_survive_the_program():
    marker = f"lmstack-daemon-{uuid.uuid4().hex}"
    prog = ("import os, sys, time\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '60', '{marker}'])\n    os._exit(0)\n"
            "time.sleep(0.3)\nprint('parent done')\n")
    r = run_code(prog, timeout=5)
    assert r.passed, r.stderr  # the program itself ends normally; its daemon must not outlive it
    time.sleep(0.3)
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
        except OSError:
            continue
    assert not alive


def test_file_size_limit():
    r = run_code("open('big', 'wb').write(b'x' * (64 * 1024 * 1024))", timeout=10)
    assert r.status == "failed" and "File too large" in r.stderr


def test_without_isolation_it_refuses_unless_opted_in(monkeypatch):
    monkeypatch.setattr(S, "isolation", lambda: S.Isolation("none", "bubblewrap (bwrap) is not installed"))
    monkeypatch.delenv(S.ALLOW_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap \(bwrap\) is not installed.*LMSTACK_ALLOW_UNSANDBOXED"):
        run_code("print(1)")
    with pytest.raises(SandboxUnavailable):
        S.run_many(["print(1)"])
    monkeypatch.setenv(S.ALLOW_ENV, "1")  # opted in: rlimits + the nonce rule, no namespaces
    assert run_code("print(1)").passed
    assert run_code("import os\nos._exit(0)").status == "failed"


def test_private_tmp_cannot_fill_the_disk():
    # each file is under the 16 MB file-size limit; together they exceed the private tmpfs
    r = run_code("for i in range(12):\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n", timeout=20)
    assert r.status == "failed" and "No space left on device" in r.stderr
    assert S.MAX_TMP_BYTES < 12 * (8 << 20)
