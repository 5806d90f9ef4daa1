"""The repair loop for generated code: generate -> parse -> run checks in the sandbox -> feed the failures back,
for a bounded number of rounds (the shape of Self-Debugging, Chen et al. 2023, and of Codex's "sample, test,
pick"; here with a 135M-parameter model on a CPU).

The checks a candidate is run against are the ones a user could see, never the hidden ones it is scored on:

- **given tests**: the examples of the docstring (``>>> f(1)`` then ``2``), read with :mod:`doctest`'s own parser
  and turned into ``assert f(1) == 2``; plus any tests the caller gives (``lmstack code`` passes its own);
- **own tests**: ``assert`` lines the model writes for the function from its signature and docstring (one greedy
  generation per problem, kept when they parse; at most ``max_own`` of them).

Each round, every candidate that fails a check gets a new prompt: the failures and its previous version as
comments above the original prompt (so the prompt stays valid Python and the syntax guard still applies), and
the model writes the function again. The candidate kept for a sample is the attempt that passed most checks
(ties: the earlier one). Everything runs in :mod:`lmstack.eval.sandbox`; the feedback parser reads only the
checks' own output line.
"""

from __future__ import annotations

import ast
import doctest
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from lmstack.eval.sandbox import run_many

MARK = "LMSTACK_CHECKS "
MAX_FAILURE_CHARS = 200


def docstring_tests(prompt: str, entry_point: str, limit: int = 8) -> list[str]:
    """The docstring's ``>>>`` examples that call ``entry_point`` with a stated result, as ``assert`` statements."""
    out = []
    try:
        examples = doctest.DocTestParser().get_examples(prompt)
    except ValueError:  # a malformed example (inconsistent indentation): no given tests
        return []
    for ex in examples:
        src = ex.source.strip()
        # the expected output runs to the next blank line, which may be the docstring's closing quotes
        want = "\n".join(ln for ln in ex.want.splitlines() if not ln.strip().startswith(('"""', "'''"))).strip()
        if entry_point not in src or not want or "\n" in src or "Traceback" in want:
            continue
        stmt = f"assert ({src}) == ({want})"
        if _parses(stmt):
            out.append(stmt)
        if len(out) >= limit:
            break
    return out


def own_tests_prompt(prompt: str, entry_point: str) -> str:
    """A prompt after which the model writes ``assert`` lines for ``entry_point`` (its signature and docstring
    stay; the body is left out, so the tests come from the specification, not from a candidate)."""
    return f"{prompt}    ...\n\n\n# unit tests for {entry_point}\nassert {entry_point}("


def parse_own_tests(completion: str, entry_point: str, max_own: int = 5) -> list[str]:
    """The lines of a generated test block that are single ``assert`` statements calling ``entry_point``."""
    text = f"assert {entry_point}(" + completion
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("assert ") and f"{entry_point}(" in line and _parses(line) and line not in out:
            out.append(line)
        if len(out) >= max_own:
            break
    return out


def _parses(src: str) -> bool:
    try:
        ast.parse(src)
        return True
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return False


def check_program(code: str, tests: Sequence[str]) -> str:
    """``code`` then each test run on its own (a failing one does not stop the others); the failures are printed
    as one JSON line after :data:`MARK`, and the program fails when any test did."""
    return (f"{code}\n\n\ndef _lmstack_checks(_tests):\n    import json\n    fails = []\n    for src in _tests:\n"
            f"        try:\n            exec(src, globals())\n        except BaseException as e:\n"
            f"            fails.append(src + ' -> ' + type(e).__name__ + (': ' + str(e) if str(e) else ''))\n"
            f"    print({MARK!r} + json.dumps(fails))\n    if fails:\n        raise SystemExit(1)\n\n\n"
            f"_lmstack_checks({list(tests)!r})\n")


@dataclass
class CheckResult:
    passed: int  # tests passed
    total: int
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.passed == self.total


def run_checks(codes: Sequence[str], tests: Sequence[Sequence[str]], *, workers: int = 2, timeout: float = 5.0,
               memory_mb: int = 1024) -> list[CheckResult]:
    """Run each ``codes[i]`` with ``tests[i]`` in the sandbox; which tests failed and why."""
    results = run_many([check_program(c, t) for c, t in zip(codes, tests)], workers=workers, timeout=timeout,
                       memory_mb=memory_mb)
    out = []
    for r, t in zip(results, tests):
        fails: list[str] | None = None
        for line in r.stdout.splitlines():
            if line.startswith(MARK):
                try:
                    v = json.loads(line[len(MARK):])
                    fails = [str(x) for x in v] if isinstance(v, list) else None
                except json.JSONDecodeError:
                    fails = None
        if fails is None:  # the code did not get to the checks: it failed to define, crashed or hung
            why = r.status if r.status == "timeout" else (r.stderr.strip().splitlines() or [r.status])[-1]
            fails = [f"the code failed before the tests ran: {why}"] + list(t)
            out.append(CheckResult(0, len(t), [f[:MAX_FAILURE_CHARS] for f in fails[:1]]))
            continue
        out.append(CheckResult(len(t) - len(fails), len(t), [f[:MAX_FAILURE_CHARS] for f in fails]))
    return out


def repair_prompt(prompt: str, completion: str, failures: Sequence[str], max_failures: int = 4,
                  max_lines: int = 30) -> str:
    """The failures and the previous version as comments, then the original prompt: valid Python, so the model
    writes the function again under the same syntax guard."""
    body = completion.splitlines()[:max_lines]
    lines = ["# A previous version of this function failed these checks:"]
    lines += [f"#   {f}" for f in failures[:max_failures]]
    lines += ["# Previous version (body):"] + [f"# {ln}" for ln in body] + ["# Write a corrected version.", ""]
    return "\n".join(" ".join(ln.splitlines()) for ln in lines) + "\n" + prompt


def repair(generate: Callable[..., list[list[str]]], prompts: Sequence[str], entry_points: Sequence[str],
           completions: list[list[str]], *, rounds: int = 2, given: Sequence[Sequence[str]] | None = None,
           own_tests: bool = True, max_own: int = 5, max_tokens: int = 256, stop: Sequence[str] = (),
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, python_syntax: bool = False,
           workers: int = 2, timeout: float = 5.0, memory_mb: int = 1024) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Repair ``completions`` (``completions[i]``: the samples of problem ``i``) for up to ``rounds`` rounds.

    ``generate(prompts, max_tokens=, stop=, temperature=, top_p=, n=, seed=, python_syntax=)`` is the
    evaluation's own generation (the serving engine). Returns the kept completions (same shape) and one log
    record per problem: the checks, and per sample the rounds used and the checks passed."""
    n_prob = len(prompts)
    tests = [docstring_tests(p, e) + list((given or [[]] * n_prob)[i]) for i, (p, e) in enumerate(zip(prompts, entry_points))]
    own: list[list[str]] = [[] for _ in range(n_prob)]
    if own_tests and rounds > 0:
        gen = generate([own_tests_prompt(p, e) for p, e in zip(prompts, entry_points)], max_tokens=96,
                       stop=["\ndef ", "\nclass ", "\nif __name__", "\n\n\n"], temperature=0.0, top_p=1.0, n=1,
                       seed=seed)
        own = [[t for t in parse_own_tests(g[0], e, max_own) if t not in tests[i]] for i, (g, e) in
               enumerate(zip(gen, entry_points))]
    checks = [tests[i] + own[i] for i in range(n_prob)]
    cur = [list(cs) for cs in completions]
    best = [list(cs) for cs in completions]
    slots = [(i, j) for i in range(n_prob) for j in range(len(cur[i])) if checks[i]]
    best_score: dict[tuple[int, int], int] = {}
    used = {s: 0 for s in slots}
    for r in range(rounds + 1):
        if not slots:
            break
        res = run_checks([prompts[i] + cur[i][j] for i, j in slots], [checks[i] for i, _ in slots],
                         workers=workers, timeout=timeout, memory_mb=memory_mb)
        failing = []
        for (i, j), c in zip(slots, res):
            if c.passed > best_score.get((i, j), -1):
                best_score[(i, j)] = c.passed
                best[i][j] = cur[i][j]
            if not c.ok:
                failing.append(((i, j), c))
        if r == rounds or not failing:
            break
        new = generate([repair_prompt(prompts[i], cur[i][j], c.failures) for (i, j), c in failing],
                       max_tokens=max_tokens, stop=list(stop), temperature=temperature, top_p=top_p, n=1,
                       seed=seed + 1 + r, python_syntax=python_syntax)
        slots = []
        for ((i, j), _), g in zip(failing, new):
            cur[i][j] = g[0]
            used[(i, j)] = r + 1
            slots.append((i, j))
    log = [{"given_tests": len(tests[i]), "own_tests": own[i],
            "rounds": [used.get((i, j), 0) for j in range(len(best[i]))],
            "checks_passed": [best_score.get((i, j), 0) for j in range(len(best[i]))]} for i in range(n_prob)]
    return best, log
