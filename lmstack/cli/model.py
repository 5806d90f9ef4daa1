"""``lmstack info DIR``: architecture, parameter count and memory at each dtype."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(model_dir: str = typer.Argument(..., help="A Hugging Face model directory.")) -> None:
        """Print a model directory's architecture, parameter count and weight memory per dtype."""
        from rich.console import Console
        from rich.table import Table

        from lmstack.model.info import model_info

        d = model_info(model_dir)
        t = Table(title=f"{model_dir}", show_header=False)
        for k, v in d["fields"].items():
            t.add_row(k, str(v))
        Console().print(t)
        m = Table(title="weight memory")
        m.add_column("dtype")
        m.add_column("bytes", justify="right")
        for k, v in d["memory"].items():
            m.add_row(k, v)
        Console().print(m)
