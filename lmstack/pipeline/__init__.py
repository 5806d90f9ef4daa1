"""``lmstack run recipe.yaml``: data -> rag -> tokenizer -> pretrain -> finetune -> eval, each stage skipped when
its inputs and config are unchanged, resumable after an interruption, summarised in ``runs/NAME/report.html``.

    from lmstack.pipeline import load_recipe, run_recipe
    result = run_recipe(load_recipe("recipes/quickstart.yaml", ["pretrain.train.steps=50"]))

See docs/quickstart.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.pipeline.recipe import STAGE_ORDER, Recipe, load_recipe
from lmstack.pipeline.runner import PipelineResult, Stage, StageContext, StageInterrupted, plan_stages, run_stages


def run_recipe(recipe: Recipe | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
               from_stage: str | None = None, only: str | None = None, console: Any = None,
               show_progress: bool | None = None) -> PipelineResult:
    """Run a recipe (object or YAML path + overrides). Prints the stage rules, the summary tables and the
    next commands to ``console`` (a rich Console; None prints nothing). Writes ``runs/NAME/report.html``."""
    from lmstack.pipeline.report import next_commands, print_summary, write_html
    from lmstack.pipeline.stages import STAGES, preflight

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe path, not to a Recipe object")
    preflight(recipe)
    result = run_stages(recipe, STAGES, from_stage=from_stage, only=only, console=console,
                        show_progress=show_progress)
    report = write_html(result)
    if console is not None:
        print_summary(result, console)
        console.print(f"report: [bold]{report}[/bold]")
        if {"pretrain", "finetune"} & {s.name for s in result.stages} or recipe.model:
            console.print("\n[bold]Talk to it:[/bold]")
            for cmd in next_commands(result):
                console.print(f"  {cmd}", highlight=False, markup=False)
    return result


def plan_recipe(recipe: Recipe | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                from_stage: str | None = None, only: str | None = None) -> list[tuple[str, str, str]]:
    """``(stage, "skip"|"run"|"resume", reason)`` for each stage ``run_recipe`` would visit; runs nothing."""
    from lmstack.pipeline.stages import STAGES

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return plan_stages(recipe, STAGES, from_stage=from_stage, only=only)


__all__ = ["run_recipe", "plan_recipe", "plan_stages", "load_recipe", "Recipe", "STAGE_ORDER", "PipelineResult", "Stage", "StageContext",
           "StageInterrupted", "run_stages"]
