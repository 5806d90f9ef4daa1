"""``lmstack code fix|complete|explain|solve|serve``: the code assistant (lmstack.apps.code) on a bundle or a model."""

from __future__ import annotations

from typing import Optional

import typer

BUNDLE = typer.Option(None, "--bundle", "-b", help="The code bundle (runs/code/bundle, written by `lmstack run "
                      "recipes/code.yaml`).")
MODEL = typer.Option(None, "--model", "-m", help="Without a bundle: a model directory or a .gguf file.")
ADAPTER = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT layout) on top of --model.")


def _assistant(bundle: Optional[str], model: Optional[str], adapter: Optional[str]):
    from lmstack.apps.code.assistant import CodeAssistant

    return CodeAssistant.load(bundle, model=model, adapter=adapter)


def register(app: typer.Typer) -> None:
    code = typer.Typer(help="Code assistant: fix a failing test in a git repo (as a commit on a new branch), "
                            "complete or explain FILE:LINE, serve with repository tools.", no_args_is_help=True)
    app.add_typer(code, name="code")

    @code.command("fix")
    def fix(repo: str = typer.Option(..., "--repo", help="A git working tree (its committed files are used)."),
            test: str = typer.Option(..., "--test", help="The test command, run in the sandbox in a copy of the "
                                     "repository (the sandbox's Python: stdlib only, e.g. 'python -m unittest')."),
            bundle: Optional[str] = BUNDLE, model: Optional[str] = MODEL, adapter: Optional[str] = ADAPTER,
            rounds: Optional[int] = typer.Option(None, "--rounds", min=1, max=10, help="Proposals tried "
                                                 "(default: the bundle's repair rounds + 1)."),
            branch: Optional[str] = typer.Option(None, "--branch", help="New branch name (default lmstack/fix-TIME); "
                                                 "an existing branch is refused."),
            timeout: float = typer.Option(60.0, "--timeout", min=1, max=3600, help="Seconds per test run.")) -> None:
        """Propose a fix for the failing test as a commit on a new branch (never your branch; never pushed)."""
        from lmstack.apps.code.repo import check_repo

        check_repo(repo)  # a bad --repo fails before the model loads
        res = _assistant(bundle, model, adapter).fix(repo, test, rounds=rounds, branch=branch, timeout=timeout)
        typer.echo(f"before: {res.before.summary()}")
        if res.after is not None:
            typer.echo(f"after:  {res.after.summary()} ({res.file}: {res.function}, {res.rounds} round(s))")
        typer.echo(res.message)
        if res.commit is None or (res.after is not None and not res.after.passed):
            raise typer.Exit(1)

    @code.command("complete")
    def complete(location: str = typer.Argument(..., help="FILE:LINE -- continue the file after this line."),
                 bundle: Optional[str] = BUNDLE, model: Optional[str] = MODEL, adapter: Optional[str] = ADAPTER,
                 max_tokens: int = typer.Option(128, "--max-tokens", min=1, max=2048),
                 constrained: bool = typer.Option(True, "--syntax-constrained/--free",
                                                  help="Keep the file valid Python (default on).")) -> None:
        """Print code that continues FILE after LINE (valid Python together with the lines before it)."""
        from lmstack.apps.code.assistant import parse_location

        path, line = parse_location(location)
        typer.echo(_assistant(bundle, model, adapter).complete_at(path, line, max_tokens=max_tokens,
                                                                  constrained=constrained), nl=False)

    @code.command("explain")
    def explain(location: str = typer.Argument(..., help="FILE:LINE -- the function (or lines) around it."),
                bundle: Optional[str] = BUNDLE, model: Optional[str] = MODEL, adapter: Optional[str] = ADAPTER,
                max_tokens: int = typer.Option(160, "--max-tokens", min=1, max=2048)) -> None:
        """Explain the function or class around FILE:LINE."""
        from lmstack.apps.code.assistant import parse_location

        path, line = parse_location(location)
        typer.echo(_assistant(bundle, model, adapter).explain_at(path, line, max_tokens=max_tokens))

    @code.command("serve")
    def serve(repo: str = typer.Option(..., "--repo", help="The repository the tools read and test."),
              test: Optional[str] = typer.Option(None, "--test", help="The command run_tests runs (in the sandbox)."),
              bundle: Optional[str] = BUNDLE, model: Optional[str] = MODEL, adapter: Optional[str] = ADAPTER,
              host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port", min=1, max=65535),
              api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMSTACK_API_KEY")) -> None:
        """OpenAI API + web chat for the model, and the tools read_file / run_tests at /v1/code/tools."""
        from lmstack.apps.code.server import serve_code

        if (bundle is None) == (model is None):
            from lmstack.errors import ConfigError

            raise ConfigError("give --bundle or --model")
        if bundle is not None:
            from lmstack.apps.bundle import read_bundle

            b = read_bundle(bundle, app="code")
            model, adapter = str(b.part("model")), (str(b.part("adapter")) if b.part("adapter") else None)
        serve_code(model, adapter=adapter, repo=repo, test_cmd=test, host=host, port=port, api_key=api_key)
