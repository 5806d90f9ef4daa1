"""Pipeline report: ``report.json`` (machine-readable) and ``report.html`` (tables, removal reasons with
examples, length histograms as embedded PNG plots)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.utils.io import atomic_write_json, atomic_write_text

# log-spaced character-length bins: 0, 1, ..., 10^7 (and beyond)
HIST_EDGES = np.concatenate([[0], np.logspace(0, 7, 43)])


def length_hist(lengths: list[int] | np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(np.asarray(lengths, dtype=np.float64), 0, 1e7), bins=HIST_EDGES)
    return counts.astype(np.int64)


def _plot(hist: dict[str, list[int]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    centers = np.sqrt(np.maximum(HIST_EDGES[:-1], 0.5) * HIST_EDGES[1:])
    for name, counts in hist.items():
        ax.step(centers, counts, where="mid", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    jpath, hpath = out_dir / "report.json", out_dir / "report.html"
    atomic_write_json(jpath, report)
    atomic_write_text(hpath, render_html(report))
    return jpath, hpath


def render_html(r: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for s in r["steps"]:
        rows.append(f"<tr><td>{e(s['name'])}</td><td>{s['docs_in']:,}</td><td>{s['docs_out']:,}</td>"
                    f"<td>{s['docs_in'] - s['docs_out']:,}</td><td>{s['chars_in']:,}</td><td>{s['chars_out']:,}</td></tr>")
    details = []
    for s in r["steps"]:
        if not s["removed"] and not s["changed"]:
            continue
        items = []
        for kind, label in (("removed", "removed"), ("changed", "changed")):
            for reason, n in s[kind].items():
                exs = "".join(f"<li><code>{e(x)}</code></li>" for x in s["examples"].get(reason, []))
                items.append(f"<li><b>{label}: {e(reason)}</b> — {n:,}<ul>{exs}</ul></li>")
        details.append(f"<h3>{e(s['name'])}</h3><ul>{''.join(items)}</ul>")
    read = r.get("read", {})
    read_items = "".join(f"<li>{e(k)}: {v:,}</li>" for k, v in read.get("problems", {}).items())
    read_ex = "".join(f"<li><code>{e(x)}</code></li>" for x in read.get("examples", []))
    plot = ""
    if r.get("histograms"):
        plot = f'<img alt="length histogram" src="data:image/png;base64,{_plot(r["histograms"])}">'
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lmstack data report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
code{{white-space:pre-wrap;font-size:85%}}</style></head><body>
<h1>lmstack data report</h1>
<p>{r['totals']['docs_in']:,} documents in, {r['totals']['docs_out']:,} out; {r['totals']['chars_in']:,} characters in,
{r['totals']['chars_out']:,} out; {r.get('elapsed_s', 0):.1f} s; output <code>{e(str(r.get('output', '')))}</code></p>
<h2>Input problems</h2><p>{read.get('files', 0):,} files, {read.get('records', 0):,} records,
{read.get('bytes', 0):,} bytes</p><ul>{read_items or '<li>none</li>'}</ul><ul>{read_ex}</ul>
<h2>Steps</h2><table><tr><th>step</th><th>docs in</th><th>docs out</th><th>removed</th><th>chars in</th>
<th>chars out</th></tr>{''.join(rows)}</table>
<h2>Length histograms</h2>{plot}
<h2>Removals and changes, with examples</h2>{''.join(details)}
</body></html>
"""
