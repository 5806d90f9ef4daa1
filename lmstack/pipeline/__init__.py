"""``lmstack run recipe.yaml``: a generic runner over an app's typed stages -- each stage skipped when its
inputs and config are unchanged, resumable after an interruption, summarised in ``runs/NAME/report.html``.

    from lmstack.pipeline import load_recipe, run_recipe
    result = run_recipe(load_recipe("recipes/scratch.yaml", ["pretrain.train.steps=50"]))

The runner imports no app: the recipe's ``app:`` is looked up by name (:func:`get_app`). How to add a stage
or an app: docs/design.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.pipeline.recipe import Recipe, load_recipe
from lmstack.pipeline.runner import (PipelineResult, Stage, StageContext, StageInterrupted, configure,
                                     fingerprints, plan_stages, run_stages)
from lmstack.pipeline.app import App, get_app, register_app


def _recipe(recipe: Recipe | str | Path, overrides: list[str] | tuple[str, ...]) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            raise ValueError("overrides apply to a recipe path, not to a Recipe object")
        return recipe
    return load_recipe(recipe, overrides)


def recipe_app(recipe: Recipe) -> App:
    """The recipe's app, with the recipe checked against it (stage order, cross-stage rules, every section)."""
    from lmstack.errors import ConfigError

    if recipe.app is None:
        raise ConfigError(f"{recipe.source or 'recipe'}: no app: a recipe that runs stages names its app "
                          "(app: support)")
    app = get_app(recipe.app)
    configure(recipe, app.registry)  # stage names, stray sections, every section against its config
    app.validate(recipe)  # the app's order and cross-stage rules
    return app


def run_recipe(recipe: Recipe | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
               from_stage: str | None = None, only: str | None = None, console: Any = None,
               show_progress: bool | None = None) -> PipelineResult:
    """Run a recipe (object or YAML path + overrides). Prints the stage rules, the summary tables and the
    next commands to ``console`` (a rich Console; None prints nothing). Writes ``runs/NAME/report.html``."""
    from lmstack.pipeline.report import print_summary, write_html

    recipe = _recipe(recipe, overrides)
    app = recipe_app(recipe)
    result = run_stages(recipe, app.registry, from_stage=from_stage, only=only, console=console,
                        show_progress=show_progress)
    report = write_html(result, app)
    if console is not None:
        print_summary(result, app, console)
        console.print(f"report: [bold]{report}[/bold]")
        cmds = app.next_commands(result)
        if cmds:
            console.print("\n[bold]Talk to it:[/bold]")
            for cmd in cmds:
                console.print(f"  {cmd}", highlight=False, markup=False)
    return result


def plan_recipe(recipe: Recipe | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                from_stage: str | None = None, only: str | None = None) -> list[tuple[str, str, str]]:
    """``(stage, "skip"|"run"|"resume", reason)`` for each stage ``run_recipe`` would visit; runs nothing."""
    recipe = _recipe(recipe, overrides)
    return plan_stages(recipe, recipe_app(recipe).registry, from_stage=from_stage, only=only)


def stage_config(model: type, path: str | None, section: str, overrides: list[str] | tuple[str, ...] = (),
                 wired: dict[str, Any] | None = None) -> Any:
    """The config of one stage from a file, as ``lmstack run`` would build it: ``lmstack pretrain -c`` and
    ``lmstack finetune -c`` call this, so one file gives one run however it is started. For a recipe of an app
    that has the stage, the app's wiring (upstream outputs, the base model) fills what the section leaves
    unset; otherwise ``wired``. Seed, device, dtype and run_dir follow :func:`lmstack.config.stage_section`."""
    from lmstack.config import is_recipe, load_stage_config, read_yaml

    doc = read_yaml(path) if path else {}
    if is_recipe(doc) and doc.get("app") and doc.get("stages"):
        recipe = load_recipe(path)
        app = get_app(recipe.app)
        if section in app.registry:
            wired = {**(wired or {}), **app.registry[section].wire(recipe)}
    return load_stage_config(model, path, section, overrides, wired)


__all__ = ["run_recipe", "plan_recipe", "plan_stages", "load_recipe", "stage_config", "recipe_app", "Recipe",
           "PipelineResult", "Stage", "StageContext", "StageInterrupted", "run_stages", "configure", "fingerprints",
           "App", "get_app", "register_app"]
