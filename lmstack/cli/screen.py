"""``lmstack screen data|score``: the two-stage risk screen (docs/screen.md). ``lmstack run recipes/screen.yaml``
builds and measures it; these verbs write the shipped data again and score items with a bundle."""

from __future__ import annotations

import json

import typer

screen_app = typer.Typer(help="Two-stage risk screen: classifier + LLM verdict on the uncertain band.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(screen_app, name="screen")


@screen_app.command("data")
def data_cmd(out: str = typer.Option(..., "--out", "-o", help="JSON Lines file to write."),
             n: int = typer.Option(2000, "--n", min=1, max=1_000_000, help="Items."),
             seed: int = typer.Option(2, "--seed")) -> None:
    """Write the synthetic payments + messages (the shipped file is the defaults)."""
    from lmstack.apps.screen.data import write

    typer.echo(str(write(out, n, seed)))


@screen_app.command("score")
def score_cmd(bundle: str = typer.Argument(..., help="A screen bundle (runs/screen/bundle)."),
              texts: list[str] = typer.Argument(None, help="Items as text (the fields, then 'message: ...')."),
              file: str = typer.Option(None, "--file", help="JSON Lines with a text field."),
              no_llm: bool = typer.Option(False, "--no-llm", help="Classifier only (the band falls back to the "
                                                                   "threshold).")) -> None:
    """One JSON line per item: label, score, who decided (classifier | llm | fallback), the LLM's reason."""
    from lmstack.apps.screen.cascade import load_screen
    from lmstack.errors import DataError
    from lmstack.utils.io import check_size, iter_jsonl

    items = list(texts or [])
    if file:
        check_size(file, 64 << 20)
        items += [str(r.get("text", ""))[:10_000] for r in iter_jsonl(file) if isinstance(r, dict)]
    if not items or not all(t.strip() for t in items):
        raise DataError("no items to score: pass texts as arguments or --file with a non-empty text field each")
    screen = load_screen(bundle, llm=not no_llm)
    for t, d in zip(items, screen.decide(items)):
        typer.echo(json.dumps({"text": t[:80], **d}, ensure_ascii=False))
