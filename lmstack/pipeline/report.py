"""What a person reads at the end of ``lmstack run``: a summary table, ``report.html``, the next commands.

The frame is the runner's: title, the stage table (each stage's ``row``), the training sections with their loss
curves (PNG embedded as base64, no network), then the app's own sections (:attr:`lmstack.pipeline.App.report`)
and the app's next commands. One self-contained page.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from lmstack.pipeline.runner import PipelineResult, Stage
from lmstack.utils.io import atomic_write_text


def fmt(v: Any) -> str:
    if v is None or v == {}:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def secs(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def table(headers: list[str], rows: list[tuple | list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def print_table(console: Any, title: str, headers: list[str] | tuple[str, ...], rows: list[tuple | list]) -> None:
    """The terminal twin of :func:`table`: a rich table with ``title`` on ``console``; nothing when no rows."""
    if not rows:
        return
    from rich.table import Table

    t = Table(title=title)
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    console.print(t)


def img(path: str | None, alt: str) -> str:
    if not path or not Path(path).is_file():
        return f"<p class='dim'>({html.escape(alt)}: no plot)</p>"
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


def stage_rows(res: PipelineResult, registry: dict[str, Stage]) -> list[tuple[str, str, str, str]]:
    """(stage, status, time, key figures) per stage."""
    rows = []
    for s in res.stages:
        st = registry.get(s.name)
        m = s.summary
        if st is not None and st.row is not None:
            fig = st.row(m)
        else:
            fig = ", ".join(f"{k}={fmt(v)}" for k, v in m.items() if not isinstance(v, (dict, list)))
        rows.append((s.name, s.status, secs(s.seconds) if s.status != "skipped" else "-", fig))
    return rows


def print_summary(res: PipelineResult, app: Any, console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"lmstack run {res.recipe.name}: {secs(res.seconds)}", show_lines=False)
    for c in ("stage", "status", "time", "result"):
        t.add_column(c, overflow="fold")
    for row in stage_rows(res, app.registry):
        t.add_row(*row)
    console.print(t)
    app.summary(res, console)


CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}.dim{color:#888}
code{background:#f4f4f4;padding:1px 4px}h2{border-bottom:1px solid #eee;padding-bottom:.2em;margin-top:1.5em}"""


def write_html(res: PipelineResult, app: Any) -> Path:
    run, recipe = res.run_dir, res.recipe
    parts = [f"<h1>lmstack run: {html.escape(recipe.name)}</h1>",
             f"<p>{html.escape(recipe.description)}</p>" if recipe.description else "",
             f"<p class='dim'>app {html.escape(str(recipe.app))}; recipe {html.escape(str(recipe.source))}; run "
             f"directory {html.escape(str(run))}; total {secs(res.seconds)}</p>",
             "<h2>Stages</h2>", table(["stage", "status", "time", "result"], stage_rows(res, app.registry))]
    for s in res.stages:  # every training stage: its figures and loss curve
        m = s.summary
        if "loss_png" in m:
            rows = [(k, fmt(v)) for k, v in m.items() if not isinstance(v, (dict, list)) and k != "loss_png"]
            parts += [f"<h2>{html.escape(s.name)}</h2>", table(["figure", "value"], rows),
                      img(m.get("loss_png"), f"{s.name} loss")]
    parts += app.report(res)
    parts += ["<h2>Next</h2>", "<pre>" + html.escape("\n".join(app.next_commands(res))) + "</pre>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>lmstack run {html.escape(recipe.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = run / "report.html"
    atomic_write_text(out, page)
    return out
