"""``lmstack eval``: evaluate a model on tasks; ``lmstack eval compare A B``; ``lmstack eval tasks``."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    ev = typer.Typer(help="Evaluate a model: perplexity, multiple choice, generation, code pass@k, classification.",
                     invoke_without_command=True, no_args_is_help=False)

    @ev.callback()
    def evaluate(
        ctx: typer.Context,
        model: Optional[str] = typer.Option(None, "--model", help="Model directory (Hugging Face layout)."),
        tasks: Optional[str] = typer.Option(None, "--tasks",
                                            help="Comma-separated shipped task names or task YAML paths."),
        out: Optional[str] = typer.Option(None, "--out", help="Output directory (results.json, reports, samples)."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT layout)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="At most N examples per task."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: auto)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16, fp16 (default: auto)."),
        batch_tokens: int = typer.Option(8192, "--batch-tokens", help="Tokens per scoring batch."),
        syntax_constrained: Optional[bool] = typer.Option(
            None, "--syntax-constrained/--no-syntax-constrained",
            help="Code tasks: keep every completion valid Python as a continuation of its prompt (default: the "
                 "task's syntax_constrained option, off)."),
        repair: Optional[int] = typer.Option(
            None, "--repair", min=0, max=5,
            help="Code tasks: rounds of the repair loop (run the docstring's examples and the model's own tests in "
                 "the sandbox, feed failures back; default: the task's repair_rounds, 0)."),
    ) -> None:
        """Evaluate MODEL on TASKS and write results.json, report.md and report.html to OUT."""
        if ctx.invoked_subcommand is not None:
            return
        if not model or not tasks:
            from lmstack.errors import ConfigError

            raise ConfigError("lmstack eval needs --model DIR and --tasks LIST (see `lmstack eval tasks`)")
        from rich.console import Console
        from rich.markdown import Markdown

        from lmstack.eval.report import to_markdown
        from lmstack.eval.run import run_eval
        from lmstack.serve.evaluation import generate

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        results = run_eval(model, names, out, adapter=adapter, limit=limit, device=device, dtype=dtype,
                           batch_tokens=batch_tokens, engine=generate, syntax_constrained=syntax_constrained,
                           repair_rounds=repair)
        Console().print(Markdown(to_markdown(results)))
        if out:
            Console().print(f"wrote {out}/results.json, report.md, report.html")

    @ev.command("compare")
    def compare(run_a: str = typer.Argument(..., help="Baseline run directory (or results.json)."),
                run_b: str = typer.Argument(..., help="New run directory (or results.json)."),
                out: Optional[str] = typer.Option(None, "--out", help="Also write the comparison as Markdown.")) -> None:
        """Print B - A for every task metric two runs share."""
        from rich.console import Console
        from rich.markdown import Markdown

        from lmstack.eval.report import compare_markdown, compare_runs
        from lmstack.utils.io import atomic_write_text

        md = compare_markdown(compare_runs(run_a, run_b))
        Console().print(Markdown(md))
        if out:
            atomic_write_text(out, md)

    @ev.command("tasks")
    def list_tasks() -> None:
        """List the shipped tasks."""
        from lmstack.eval.task import load_task, shipped_tasks

        for name in shipped_tasks():
            t = load_task(name)
            typer.echo(f"{name:14s} {t.type:16s} {t.description}")

    @ev.command("export-lm-eval")
    def export(task: str = typer.Argument(..., help="A multiple_choice task name or YAML."),
               out: str = typer.Argument(..., help="Directory for the lm-eval task YAML + data.")) -> None:
        """Write an lm-evaluation-harness task equivalent to an lmstack multiple-choice task."""
        from lmstack.eval.lmeval_task import export_lm_eval_task

        name = export_lm_eval_task(task, out)
        typer.echo(f"wrote {out}/{name}.yaml; run: python -m lmstack.eval.harness --model lmstack "
                   f"--model_args pretrained=DIR --include_path {out} --tasks {name}")

    app.add_typer(ev, name="eval")
