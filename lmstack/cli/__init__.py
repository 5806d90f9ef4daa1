"""The ``lmstack`` command. One verb per stage; each parses arguments and calls one library function.

Each area registers its verbs in its own module (``lmstack/cli/<area>.py``) exposing ``register(app)``;
heavy imports stay inside the command functions so ``lmstack --help`` is fast.
A :class:`~lmstack.errors.LmstackError` becomes one line on stderr and exit code 2 (``--debug``: traceback).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from lmstack.errors import LmstackError

# Order is the order of `lmstack --help`.
AREAS = ("model", "generate", "tokenizer", "data", "train", "tune", "eval", "serve", "pipeline", "support")

app = typer.Typer(
    name="lmstack",
    help="lmstack: data -> tokenizer -> pretrain -> finetune -> eval -> serve, in one package.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["LMSTACK_DEBUG"] = "1"


def _register_all() -> None:
    for area in AREAS:
        try:
            mod = importlib.import_module(f"lmstack.cli.{area}")
        except ModuleNotFoundError as e:
            if e.name == f"lmstack.cli.{area}":
                continue  # that area has no commands yet
            raise
        mod.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, standalone_mode=False)
    except LmstackError as e:
        if debug or os.environ.get("LMSTACK_DEBUG"):
            raise
        print(f"lmstack: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("lmstack: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
