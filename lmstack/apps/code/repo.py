"""``lmstack code fix``: propose a change in a git working tree as a commit on a new branch.

1. The repository's committed files (``git archive HEAD``: the user's uncommitted edits and untracked files are
   not read, capped at :data:`MAX_FILES` files / :data:`MAX_BYTES` bytes of text) are copied into the sandbox
   (:mod:`lmstack.eval.sandbox`: no network, no host files, rlimits) and the test command runs there. The
   change the model proposes is untrusted code, and so is the repository's test suite: neither ever runs on
   the host.
2. A failing run's traceback names the deepest frame in a repository file that is not a test file (or, for an
   assertion inside a test, the failing test line names a repository function it calls): that function is
   rewritten (its header and docstring kept, the failure and the previous body fed back as comments,
   the body generated under the Python-syntax guard) and the tests run again, for at most ``rounds`` rounds.
3. The best proposal is committed on a new branch ``lmstack/fix-...`` made with ``git worktree add`` in a
   temporary directory that is removed afterwards: the user's branch, index and working tree are never touched,
   nothing is pushed, and the commit message carries the test command and its result before and after.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import re
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmstack.errors import ConfigError, DataError

MAX_FILES = 2000
MAX_BYTES = 8 * 1024 * 1024  # text in the sandbox's copy (its /tmp is a 64 MiB tmpfs)
SANDBOX_ROOT = "/tmp/repo"
EXIT_MARK = "LMSTACK_EXIT "

_RUNNER = r'''
import base64, json, os, subprocess, sys, zlib
files = json.loads(zlib.decompress(base64.b64decode(DATA)).decode("utf-8"))
root = ROOT
for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin", PYTHONDONTWRITEBYTECODE="1")
try:
    p = subprocess.run(CMD, shell=True, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    out, code = p.stdout.decode("utf-8", "replace"), p.returncode
except subprocess.TimeoutExpired:
    out, code = "(timed out)", 124
sys.stdout.write(out[-6000:])
print()
print(MARK + str(code))
if code != 0:
    raise SystemExit(1)
'''


def _git(repo: Path, *args: str, check: bool = True) -> str:
    p = subprocess.run(["git", "-C", str(repo), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise DataError(f"git {' '.join(args[:2])} in {repo}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return p.stdout


def check_repo(repo: str | Path) -> Path:
    """A git working tree with at least one commit, or one clear error."""
    p = Path(repo).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--repo {repo}: not a directory")
    if subprocess.run(["git", "-C", str(p), "rev-parse", "--verify", "-q", "HEAD"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        raise ConfigError(f"--repo {repo}: not a git working tree with a commit (git init; git commit)")
    return Path(_git(p, "rev-parse", "--show-toplevel").strip())


def head_files(repo: Path) -> dict[str, str]:
    """The committed text files at HEAD (binary files are left out), within the caps."""
    data = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "HEAD"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    if data.returncode != 0:
        raise DataError(f"git archive HEAD in {repo}: {data.stderr.decode(errors='replace').strip()}")
    out, total = {}, 0
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as tar:
        for m in tar:
            if not m.isfile():
                continue
            if len(out) >= MAX_FILES or total + m.size > MAX_BYTES:
                raise DataError(f"{repo}: more than {MAX_FILES} files or {MAX_BYTES >> 20} MiB of text at HEAD; "
                                "lmstack code fix copies the repository into its sandbox and is capped there")
            f = tar.extractfile(m)
            raw = f.read() if f else b""
            try:
                out[m.name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            total += m.size
    return out


@dataclass
class TestRun:
    passed: bool
    exit_code: int | None
    output: str

    def summary(self) -> str:
        return "passed" if self.passed else f"failed (exit {self.exit_code})"


def run_tests(files: dict[str, str], cmd: str, timeout: float = 60.0, memory_mb: int = 2048) -> TestRun:
    """Run ``cmd`` in a copy of ``files`` inside the sandbox (working directory: the copy's root)."""
    from lmstack.eval.sandbox import run_code

    blob = base64.b64encode(zlib.compress(json.dumps(files).encode("utf-8"))).decode("ascii")
    prog = (f"DATA = {blob!r}\nROOT = {SANDBOX_ROOT!r}\nCMD = {cmd!r}\nTIMEOUT = {float(timeout)!r}\n"
            f"MARK = {EXIT_MARK!r}\n" + _RUNNER)
    r = run_code(prog, timeout=timeout + 10, memory_mb=memory_mb, max_output=8000)
    m = re.search(rf"^{EXIT_MARK}(-?\d+)$", r.stdout, re.M)
    code = int(m.group(1)) if m else None
    out = r.stdout[:m.start()] if m else (r.stdout + r.stderr)
    return TestRun(r.passed and code == 0, code, out.rstrip()[-4000:])


# ----------------------------------------------------------------------------------------- where to fix
_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<func>[\w<>]+)')


def _is_test(rel: str) -> bool:
    name = Path(rel).name
    return name.startswith("test_") or name.endswith("_test.py") or "tests" in Path(rel).parts or name == "conftest.py"


def _functions(files: dict[str, str]) -> dict[str, tuple[str, ast.FunctionDef]]:
    """name -> (file, def) of the functions defined in the repository's non-test .py files (first one wins)."""
    out: dict[str, tuple[str, ast.FunctionDef]] = {}
    for rel in sorted(files):
        if not rel.endswith(".py") or _is_test(rel):
            continue
        try:
            tree = ast.parse(files[rel])
        except SyntaxError:
            continue
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.setdefault(n.name, (rel, n))
    return out


def failing_function(files: dict[str, str], output: str) -> tuple[str, ast.FunctionDef] | None:
    """(file, function) to rewrite: the deepest traceback frame in a repository .py file that is not a test;
    when the failure is an assertion inside a test (no such frame), a repository function that the failing
    test line calls."""
    best = None
    test_lines: list[str] = []
    lines = output.splitlines()
    for i, ln in enumerate(lines):
        m = _FRAME.search(ln)
        if not m:
            continue
        path = m.group("path")
        rel = path[len(SANDBOX_ROOT) + 1:] if path.startswith(SANDBOX_ROOT + "/") else path
        if rel not in files or not rel.endswith(".py"):
            continue
        if _is_test(rel):
            if i + 1 < len(lines):
                test_lines.append(lines[i + 1].strip())
            continue
        best = (rel, int(m.group("line")))
    if best is None:
        defs = _functions(files)
        for src in reversed(test_lines):
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue
            for n in ast.walk(tree):
                if isinstance(n, ast.Call):
                    name = n.func.id if isinstance(n.func, ast.Name) else \
                        n.func.attr if isinstance(n.func, ast.Attribute) else None
                    if name in defs and not name.startswith("assert"):
                        return defs[name]
        return None
    rel, line = best
    try:
        tree = ast.parse(files[rel])
    except SyntaxError:
        return None
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and n.lineno <= line <= (n.end_lineno or n.lineno)]
    if not funcs:
        return None
    return rel, max(funcs, key=lambda n: n.lineno)  # the innermost


def body_start(source: str, fn: ast.FunctionDef) -> int:
    """0-based index of the first line after the header and the docstring (what is rewritten)."""
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno or first.lineno
    return first.lineno - 1


def cut_body(completion: str, indent: int) -> str:
    """The generated body up to the first line that dedents to the function's own level or further."""
    out = []
    for ln in completion.splitlines():
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        out.append(ln)
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------- the fix
@dataclass
class FixResult:
    before: TestRun
    after: TestRun | None = None
    branch: str | None = None
    commit: str | None = None
    file: str | None = None
    function: str | None = None
    rounds: int = 0
    attempts: list[str] = field(default_factory=list)
    message: str = ""


# generate(prompt) -> completion: the assistant's syntax-constrained code completion of ``prompt``
Generate = Callable[[str], str]


def fix(repo: str | Path, test_cmd: str, generate: Generate, *, rounds: int = 3, branch: str | None = None,
        timeout: float = 60.0, model_name: str = "model") -> FixResult:
    from lmstack.eval.repair import repair_prompt

    root = check_repo(repo)
    if not test_cmd.strip():
        raise ConfigError("--test: give the command that runs the tests (e.g. 'python -m unittest')")
    files = head_files(root)
    before = run_tests(files, test_cmd, timeout)
    res = FixResult(before)
    if before.passed:
        res.message = "the tests already pass at HEAD: nothing to fix"
        return res
    where = failing_function(files, before.output)
    if where is None:
        res.message = ("no function to fix: the failure's traceback names no function in a non-test .py file of "
                       "the repository")
        return res
    rel, fn = where
    res.file, res.function = rel, fn.name
    src = files[rel]
    lines = src.splitlines(keepends=True)
    start = body_start(src, fn)
    end = fn.end_lineno or start
    header = "".join(lines[fn.lineno - 1 - len(fn.decorator_list):start])
    before_fn = "".join(lines[:fn.lineno - 1 - len(fn.decorator_list)])
    after_fn = "".join(lines[end:])
    indent = fn.col_offset
    body = "".join(lines[start:end])
    best: tuple[str, TestRun] | None = None
    failure = before.output
    for r in range(rounds):
        tail = [ln for ln in failure.strip().splitlines() if ln.strip()][-4:]
        prompt = before_fn + repair_prompt(header, body, tail)  # comments may sit at column 0 anywhere
        new_body = cut_body(generate(prompt), indent)
        res.rounds = r + 1
        if not new_body.strip():
            continue
        new_src = before_fn + header + new_body + after_fn
        res.attempts.append(new_body)
        run = run_tests({**files, rel: new_src}, test_cmd, timeout)
        if best is None or (run.passed and not best[1].passed):
            best = (new_src, run)
        if run.passed:
            break
        body, failure = new_body, run.output
    if best is None:
        res.message = f"the model proposed no new body for {rel}:{fn.name} in {rounds} rounds; nothing committed"
        return res
    new_src, run = best
    res.after = run
    res.branch = branch or _new_branch(root)
    msg = (f"lmstack code fix: {rel}: {fn.name} ({'tests pass' if run.passed else 'tests still fail'})\n\n"
           f"Test command: {test_cmd}\nBefore: {before.summary()}\nAfter:  {run.summary()}\n"
           f"Rounds: {res.rounds}; model: {model_name}\n\n"
           "Proposed by `lmstack code fix` (the tests ran in lmstack's sandbox on the committed files); review "
           "before merging.\n\nLast test output:\n" + "\n".join(run.output.splitlines()[-15:]) + "\n")
    res.commit = commit_on_branch(root, res.branch, {rel: new_src}, msg)
    res.message = f"committed {res.commit[:12]} on branch {res.branch}: {run.summary()}"
    return res


def _new_branch(root: Path) -> str:
    import datetime as _dt

    stem = "lmstack/fix-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name, i = stem, 1
    while _git(root, "rev-parse", "--verify", "-q", f"refs/heads/{name}", check=False).strip():
        i += 1
        name = f"{stem}-{i}"
    return name


def commit_on_branch(root: Path, branch: str, changes: dict[str, str], message: str) -> str:
    """Commit ``changes`` on a new ``branch`` from HEAD in a temporary worktree; returns the commit id. The
    user's checkout (branch, index, files) is not touched; nothing is pushed."""
    if _git(root, "check-ref-format", "--branch", branch, check=False).strip() != branch:
        raise ConfigError(f"--branch {branch!r}: not a valid git branch name")
    if _git(root, "rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False).strip():
        raise ConfigError(f"--branch {branch}: that branch exists; lmstack code fix only creates new branches")
    with tempfile.TemporaryDirectory(prefix="lmstack-fix-") as tmp:
        wt = Path(tmp) / "wt"
        _git(root, "worktree", "add", "-q", "-b", branch, str(wt), "HEAD")
        try:
            for rel, text in changes.items():
                (wt / rel).write_text(text, encoding="utf-8")
                _git(wt, "add", "--", rel)
            _git(wt, "-c", "user.name=lmstack code fix", "-c", "user.email=lmstack@localhost", "-c",
                 "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", message)
            return _git(wt, "rev-parse", "HEAD").strip()
        finally:
            _git(root, "worktree", "remove", "--force", str(wt), check=False)
            _git(root, "worktree", "prune", check=False)
