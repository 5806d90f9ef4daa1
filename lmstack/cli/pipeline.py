"""``lmstack run RECIPE [--from STAGE | --only STAGE] [--section.key=value ...]``: the end-to-end pipeline."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def run(
        ctx: typer.Context,
        recipe: str = typer.Argument(..., help="A recipe YAML, e.g. recipes/quickstart.yaml."),
        from_stage: str = typer.Option(None, "--from", help="Rerun this stage and every later one."),
        only: str = typer.Option(None, "--only", help="Run only this stage (earlier ones must be done)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs only)."),
        plan: bool = typer.Option(False, "--plan", help="Show which stages would run, resume or be skipped; run nothing."),
    ) -> None:
        """Run a recipe's stages (its app's: the support app has data, rag, tokenizer, pretrain, finetune, reader,
        eval, bundle); unchanged stages are skipped, an interrupted one resumes.

        Any recipe field can be overridden: --pretrain.train.steps=50 --eval.heldout_limit=40"""
        import os

        from rich.console import Console

        from lmstack.pipeline import plan_recipe, run_recipe

        if plan:
            for name, action, why in plan_recipe(recipe, list(ctx.args), from_stage=from_stage, only=only):
                typer.echo(f"{name:10s} {action:7s} {why}")
            return
        if no_progress:
            os.environ["LMSTACK_NO_PROGRESS"] = "1"
        run_recipe(recipe, list(ctx.args), from_stage=from_stage, only=only, console=Console(),
                   show_progress=False if no_progress else None)
