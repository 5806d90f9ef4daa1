"""The code sandbox: kills hangs, blocks the network, contains crashes and memory blow-ups."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from lmstack.eval.code import program, score_code
from lmstack.eval.metrics import pass_at_k
from lmstack.eval.sandbox import isolation, run_code, run_many
from lmstack.eval.task import load_task


def test_passing_and_failing_programs():
    ok = run_code("assert sum(range(4)) == 6\nprint('ok')")
    assert ok.passed and ok.status == "passed" and ok.stdout.strip() == "ok"
    bad = run_code("assert 1 == 2, 'nope'")
    assert not bad.passed and bad.status == "failed" and "AssertionError: nope" in bad.stderr
    crash = run_code("import os\nos.abort()")
    assert not crash.passed and crash.status == "failed"


def test_infinite_loop_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    r = run_code("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 5


def test_child_processes_of_a_hanging_sample_are_killed_too():
    r = run_code("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'while True: pass'])", timeout=1.0)
    assert r.status == "timeout"


def test_memory_limit_turns_a_blow_up_into_a_failure():
    r = run_code("x = bytearray(3 * 1024 ** 3)\nprint(len(x))", memory_mb=256)
    assert r.status == "failed" and "MemoryError" in r.stderr


@pytest.fixture
def local_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.sendall(b"hello")
                c.close()
            except OSError:
                continue

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    yield port
    stop.set()
    th.join()
    srv.close()


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint(s.recv(5))"
RAW = "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint(s.recv(5))"


def test_network_call_is_blocked(local_server):
    code = CONNECT.format(port=local_server)
    exec_ns: dict = {}
    exec(compile(code.replace("print(s.recv(5))", "got = s.recv(5)"), "<ref>", "exec"), exec_ns)  # reachable here
    assert exec_ns["got"] == b"hello"
    r = run_code(code, timeout=5)
    assert not r.passed and "network access is disabled" in r.stderr
    r = run_code(code, timeout=5, isolate_network=False)  # the socket guard alone also blocks it
    assert not r.passed and "network access is disabled" in r.stderr


def test_network_namespace_blocks_raw_sockets(local_server):
    # bypasses the Python-level guard with the C module: only the empty namespace stops it
    r = run_code(RAW.format(port=local_server), timeout=5)
    assert not r.passed and ("refused" in r.stderr or "unreachable" in r.stderr.lower())


def test_runs_in_a_private_temporary_directory_removed_afterwards(monkeypatch):
    import os
    import tempfile

    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    r = run_code("import os\nopen('x.txt', 'w').write('1')\nprint(os.getcwd(), sorted(os.listdir('.')))")
    assert r.passed and r.stdout.split()[0] == "/tmp", r.stderr
    assert len(made) == 1 and "lmstack-sandbox-" in made[0] and not os.path.exists(made[0])


def test_code_task_scoring_counts_hangs_and_crashes_as_failures():
    task = load_task("code_mini")
    task.timeout = 1.0
    import json

    rows = [json.loads(x) for x in open(task.data, encoding="utf-8")][:2]
    probs = [{"task_id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
              "line": i + 1} for i, r in enumerate(rows)]
    completions = [
        [rows[0]["canonical_solution"], "    while True:\n        pass\n", "    raise SystemExit(3)\n"],
        [rows[1]["canonical_solution"], rows[1]["canonical_solution"], "    return None\n"],
    ]
    task.k = [1, 2]
    res = score_code(probs, completions, task)
    assert res["samples"][0]["status"] == ["passed", "timeout", "failed"]
    assert res["samples"][1]["passed"] == [True, True, False]
    for k in (1, 2):
        assert res["metrics"][f"pass@{k}"] == pytest.approx((pass_at_k(3, 1, k) + pass_at_k(3, 2, k)) / 2)


def test_every_shipped_problem_passes_with_its_reference_solution():
    import json

    rows = [json.loads(x) for x in open(load_task("code_mini").data, encoding="utf-8")]
    assert len(rows) >= 12
    res = run_many([program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in rows])
    assert [r.status for r in res] == ["passed"] * len(rows)
    res = run_many([program(r["prompt"], "    pass\n", r["test"], r["entry_point"]) for r in rows])
    assert not any(r.passed for r in res)  # the tests really test something


def test_detached_grandchildren_die_with_the_sample():
    import os
    import uuid

    marker = f"lmstack-test-{uuid.uuid4().hex}"
    code = ("import os, subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'], "
            "start_new_session=True)\n"
            "time.sleep(60)\n")
    t0 = time.perf_counter()
    assert run_code(code, timeout=1.0).status == "timeout"
    assert time.perf_counter() - t0 < 4  # nothing kept the pipes open
    time.sleep(0.3)
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    alive.append(pid)
        except OSError:
            continue
    assert not alive
