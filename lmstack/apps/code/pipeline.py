"""The code app as a pipeline: a real pretrained model (imported from GGUF), HumanEval pass@k in three modes
(free, syntax-constrained, constrained + repair), and the bundle ``lmstack code ... --bundle`` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.apps.code import recipe as cfg
from lmstack.apps.code import stages as st
from lmstack.pipeline import App, Recipe, Stage, register_app
from lmstack.pipeline.report import fmt, print_table, table
from lmstack.pipeline.runner import PipelineResult
from lmstack.pipeline.stages import base_stage
from lmstack.utils.io import model_dir_hash


def _model_input(r: Recipe) -> dict[str, str]:
    return {"model": model_dir_hash(Path(r.model))} if r.model else {}


def _check(r: Recipe) -> None:
    if r.model is not None and "base" in r.stages:
        raise ValueError("the model comes from one place: `model:` and the base stage both give one; keep one")
    if {"eval", "bundle"} & set(r.stages) and r.model is None and "base" not in r.stages:
        raise ValueError("eval/bundle need a model: add the base stage (a GGUF file) or set `model:`")


def rows(res: PipelineResult) -> list[tuple[str, ...]]:
    out = []
    for name, v in (res.summary("eval").get("results") or {}).items():
        syn = v.get("syntax") or {}
        out.append((name, str(v["n"]), str(v["n_samples"]), ", ".join(f"{k} {fmt(x)}" for k, x in v["metrics"].items()),
                    f"{syn.get('parsed')}/{syn.get('total')}", fmt(v.get("seconds_per_problem"))))
    return out


HEAD = ("run", "problems", "samples", "pass@k", "parses", "s/problem")


def print_tables(res: PipelineResult, console: Any) -> None:
    print_table(console, "HumanEval (lmstack's sandbox)", HEAD, rows(res))


def next_commands(res: PipelineResult) -> list[str]:
    b = res.summary("bundle").get("bundle")
    return [f"lmstack code fix --bundle {b} --repo DIR --test 'python -m unittest'",
            f"lmstack code complete --bundle {b} FILE.py:LINE",
            f"lmstack code serve --bundle {b} --repo DIR --test 'python -m unittest'"] if b else []


APP = register_app(App(
    "code",
    description="code assistant: syntax-constrained generation, a sandboxed repair loop, HumanEval pass@k",
    check=_check, summary=print_tables, next_commands=next_commands,
    report=lambda res: [f"<h2>HumanEval</h2>{table(HEAD, rows(res))}"] if rows(res) else [],
    stages=[
        base_stage(description="the pretrained model the assistant runs, imported from a GGUF file"),
        Stage("eval", st.run_eval, config=cfg.EvalStage, deps=lambda r: [n for n in ("base",) if n in r.stages],
              description="HumanEval pass@k: free, syntax-constrained, constrained + repair", inputs=_model_input,
              outputs=lambda c: [c.out_dir / "summary.json"],
              row=lambda m: "; ".join(f"{k}: " + ", ".join(f"{a} {fmt(b)}" for a, b in v["metrics"].items())
                                      for k, v in (m.get("results") or {}).items())),
        Stage("bundle", st.run_bundle, config=cfg.BundleStage, deps=lambda r: [n for n in ("base",) if n in r.stages],
              description="the assistant in one directory: model + settings", inputs=_model_input,
              depends=lambda r: {"bundle": st.section(r, "bundle").model_dump()},
              outputs=lambda c: [c.out_dir / "manifest.json"], row=lambda m: f"{m.get('bundle')}: {m.get('files')} files"),
    ]))
