"""Evaluation: perplexity, multiple choice, generation (BLEU / chrF / ROUGE / EM / F1), code pass@k in a
sandbox, classification; JSON + Markdown + HTML reports; run comparison; an lm-evaluation-harness model type.

Python API::

    from lmstack.eval import run_eval, compare_runs
    results = run_eval("runs/x/final", ["mc_en", "qa_en", "my_task.yaml"], "evals/x", limit=100)

Heavy modules load lazily so ``import lmstack.eval`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_eval", "compare_runs", "load_task", "shipped_tasks", "load_results", "EvalLM"]


def __getattr__(name: str) -> Any:
    if name == "run_eval":
        from lmstack.eval.run import run_eval
        return run_eval
    if name in ("compare_runs", "load_results"):
        from lmstack.eval import report
        return getattr(report, name)
    if name in ("load_task", "shipped_tasks"):
        from lmstack.eval import task
        return getattr(task, name)
    if name == "EvalLM":
        from lmstack.eval.lm import EvalLM
        return EvalLM
    raise AttributeError(f"module 'lmstack.eval' has no attribute {name!r}")
