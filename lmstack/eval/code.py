"""Code generation scored by execution: HumanEval format (Chen et al. 2021) and the unbiased pass@k.

Each record has ``task_id``, ``prompt`` (signature + docstring), ``test`` (defines ``check(candidate)``) and
``entry_point``. The model completes the prompt ``n_samples`` times; each program
``prompt + completion + test + check(entry_point)`` runs in :mod:`lmstack.eval.sandbox`. A sample passes when
the program exits 0 within the time and memory limits; crashes, hangs and blow-ups count as failures.

With the task option ``syntax_constrained: true`` (``lmstack eval --syntax-constrained``) each completion is
decoded under the Python-syntax guard with its own prompt as the code it continues
(``lmstack.serve.python_syntax``), so a completion that ends (end of turn or a stop string) parses together with
its prompt. With ``repair_rounds: N`` (``lmstack eval --repair N``) the completions then go through the repair
loop (:mod:`lmstack.eval.repair`: the docstring's examples and the model's own tests run in the sandbox, failures
fed back) before they are scored on the hidden tests. Either way the result has ``syntax``: how many of the programs' ``prompt + completion`` parse.
"""

from __future__ import annotations

import ast

from lmstack.eval.metrics import mean_pass_at_k
from lmstack.eval.records import read_records
from lmstack.eval.sandbox import run_many


def program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def evaluate_code(lm, task, progress=None) -> dict:
    recs = read_records(task.data, task.name)
    items = recs.items[:task.limit] if task.limit else recs.items
    probs = [{"task_id": str(r.data.get("task_id", f"line{r.line}")), "prompt": str(r.get(task.name, "prompt")),
              "test": str(r.get(task.name, "test")), "entry_point": str(r.get(task.name, "entry_point")),
              "line": r.line} for r in items]
    cb = None
    if progress is not None:
        bar = progress.add_task(f"{task.name} (generate)", total=len(probs) * task.n_samples)
        cb = lambda k: progress.advance(bar, k)  # noqa: E731
    syntax = getattr(task, "syntax_constrained", False)
    completions = lm.generate([p["prompt"] for p in probs], max_tokens=task.max_tokens, stop=task.stop,
                              temperature=task.temperature, top_p=task.top_p, n=task.n_samples, seed=task.seed,
                              progress_cb=cb, **({"python_syntax": True} if syntax else {}))
    log = None
    if getattr(task, "repair_rounds", 0):
        from lmstack.eval.repair import repair

        completions, log = repair(lm.generate, [p["prompt"] for p in probs], [p["entry_point"] for p in probs],
                                  completions, rounds=task.repair_rounds, own_tests=task.own_tests,
                                  max_tokens=task.max_tokens, stop=task.stop, temperature=task.temperature,
                                  top_p=task.top_p, seed=task.seed, python_syntax=syntax, workers=task.workers,
                                  timeout=task.timeout, memory_mb=task.memory_mb)
    out = score_code(probs, completions, task, progress)
    if log is not None:
        out["repair"] = {"rounds": task.repair_rounds,
                         "repaired": sum(r > 0 for rec in log for r in rec["rounds"]),
                         "own_tests": sum(len(rec["own_tests"]) for rec in log),
                         "given_tests": sum(rec["given_tests"] for rec in log)}
        for s, rec in zip(out["samples"], log):
            s["repair"] = rec
    return out


def score_code(probs: list[dict], completions: list[list[str]], task, progress=None) -> dict:
    """Run every (problem, completion) in the sandbox and compute pass@k."""
    progs = [program(p["prompt"], c, p["test"], p["entry_point"]) for p, cs in zip(probs, completions) for c in cs]
    cb = None
    if progress is not None:
        bar = progress.add_task(f"{task.name} (run tests)", total=len(progs))
        cb = lambda: progress.advance(bar, 1)  # noqa: E731
    results = run_many(progs, workers=task.workers, timeout=task.timeout, memory_mb=task.memory_mb, on_done=cb)
    counts, samples, i = [], [], 0
    for p, cs in zip(probs, completions):
        rs = results[i:i + len(cs)]
        i += len(cs)
        counts.append((len(cs), sum(r.passed for r in rs)))
        samples.append({"task_id": p["task_id"], "line": p["line"], "passed": [r.passed for r in rs],
                        "status": [r.status for r in rs], "completion": cs[0],
                        "error": next((r.stderr[-300:] for r in rs if not r.passed), "")})
    metrics = {f"pass@{k}": mean_pass_at_k(counts, k) for k in task.k}
    parsed = sum(parses(p["prompt"], c) for p, cs in zip(probs, completions) for c in cs)
    return {"metrics": metrics, "n": len(probs), "n_samples": task.n_samples,
            "syntax": {"constrained": bool(getattr(task, "syntax_constrained", False)), "parsed": parsed,
                       "total": len(progs)},
            "samples": samples}


def parses(prompt: str, completion: str) -> bool:
    """Whether prompt + completion is a syntactically valid Python module (what the syntax guard ensures)."""
    try:
        compile(prompt + completion, "<completion>", "exec", ast.PyCF_ONLY_AST)
        return True
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return False
