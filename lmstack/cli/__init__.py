"""The ``lmstack`` command. One verb per stage; each parses arguments and calls one library function.

Each area registers its verbs in its own module (``lmstack/cli/<area>.py``) exposing ``register(app)``;
heavy imports stay inside the command functions so ``lmstack --help`` is fast.
A :class:`~lmstack.errors.LmstackError`, a usage error (typer's bundled click included) or an OS error on a
user's path becomes one line on stderr and exit code 2 (``--debug``: traceback). SIGINT / SIGTERM exit 130 / 143
with one line saying what was kept (training: the checkpoint and ``--resume auto``).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from lmstack.errors import LmstackError, Terminated

# Order is the order of `lmstack --help`.
AREAS = ("model", "generate", "tokenizer", "data", "train", "tune", "eval", "classify", "serve", "export", "pipeline", "support",
         "guard", "audit", "watermark", "screen", "seq2seq", "rag", "clip", "rl", "code", "products")

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


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _click_errors() -> tuple[type[BaseException], ...]:
    """click's ClickException, and the one bundled inside typer (not a subclass of click's)."""
    import click

    errs: list[type[BaseException]] = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as bundled
    except ImportError:  # a typer that uses click itself
        pass
    else:
        errs.append(bundled.ClickException)
    return tuple(errs)


def _usage_line(e: BaseException) -> str:
    """One line for a click usage error: the message, where (the command) and what to do."""
    msg = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "lmstack"
    msg = " ".join(msg.split()).rstrip(".")
    return f"{where}: {msg}; see `{where} --help`"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. User mistakes: one line on stderr, status 2 (``--debug``: traceback).
    SIGINT / SIGTERM: one line on what was kept, status 130 / 143."""
    import signal
    import threading

    args = argv if argv is not None else sys.argv[1:]
    debug = "--debug" in args or bool(os.environ.get("LMSTACK_DEBUG"))
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="lmstack")
    except LmstackError as e:
        if debug or os.environ.get("LMSTACK_DEBUG"):
            raise
        print(f"lmstack: {e}", file=sys.stderr)
        return e.exit_code
    except (KeyboardInterrupt, Terminated) as e:
        return _interrupted(isinstance(e, Terminated))
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # noqa: BLE001 -- click usage errors and OS errors on the user's paths
        if debug:
            raise
        if isinstance(e, _click_errors()):
            if type(e).__name__ == "Abort":
                print("lmstack: aborted", file=sys.stderr)
                return 130
            if type(e).__name__ == "NoArgsIsHelpError":  # the help was shown
                return 2
            print(_usage_line(e), file=sys.stderr)
            return 2 if getattr(e, "exit_code", 1) in (1, 2) else e.exit_code
        if isinstance(e, (typer.Abort,)):
            print("lmstack: aborted", file=sys.stderr)
            return 130
        if isinstance(e, OSError) and (e.filename or isinstance(e, PermissionError)):
            where = f" {e.filename}" if e.filename else ""
            print(f"lmstack: cannot use{where}: {e.strerror or e}; check the path and its permissions",
                  file=sys.stderr)
            return 2
        if isinstance(e, UnicodeDecodeError):
            print(f"lmstack: a file is not UTF-8 text ({e.reason} at byte {e.start}); pass a text file",
                  file=sys.stderr)
            return 2
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if rc == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent Exit(130)
        return _interrupted(False)
    return rc if isinstance(rc, int) else 0


def _interrupted(term: bool) -> int:
    print(f"lmstack: interrupted by {'SIGTERM' if term else 'SIGINT'}; outputs are written atomically, so nothing "
          "partial was kept (finished --shard outputs and checkpoints stay); run the command again to continue",
          file=sys.stderr)
    return 143 if term else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
