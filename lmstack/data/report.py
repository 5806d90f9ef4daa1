"""Pipeline report: ``report.json`` (machine-readable) and ``report.html`` (tables, removal reasons with
examples, length histograms as inline SVG plots)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.utils.io import atomic_write_json, atomic_write_text

# log-spaced character-length bins: 0, 1, ..., 10^7 (and beyond)
HIST_EDGES = np.concatenate([[0], np.logspace(0, 7, 43)])


def length_hist(lengths: list[int] | np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(np.asarray(lengths, dtype=np.float64), 0, 1e7), bins=HIST_EDGES)
    return counts.astype(np.int64)


def svg_histogram(hist: dict[str, list[int]], edges: np.ndarray = HIST_EDGES, width: int = 760, height: int = 260
                  ) -> str:
    """Inline SVG bar chart of document-length histograms on log-spaced bins (one colour per series).

    Hand-written SVG instead of matplotlib: no heavy import, and the report stays one self-contained file."""
    colors = ["#4c78a8", "#f58518", "#54a24b", "#e45756"]
    series = [(k, np.asarray(v, dtype=np.int64)) for k, v in hist.items()]
    nz = np.flatnonzero(sum(v for _, v in series) > 0) if series else np.zeros(0, int)
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 1)
    ymax = max(1, max(int(v[lo:hi].max()) for _, v in series)) if series else 1
    left, bottom, top, right = 60, 40, 20, 10
    pw, ph = width - left - right, height - top - bottom
    nb = hi - lo
    bw = pw / max(nb, 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>']
    for si, (name, v) in enumerate(series):
        sub = bw / max(len(series), 1)
        for k in range(lo, hi):
            h = ph * v[k] / ymax
            x = left + (k - lo) * bw + si * sub
            parts.append(f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{max(sub - 1, 1):.1f}" height="{h:.1f}" '
                         f'fill="{colors[si % 4]}"><title>{name}: {v[k]:,} docs, {edges[k]:.0f}-{edges[k + 1]:.0f} '
                         f'chars</title></rect>')
        parts.append(f'<rect x="{left + 10 + si * 120}" y="4" width="10" height="10" fill="{colors[si % 4]}"/>'
                     f'<text x="{left + 24 + si * 120}" y="13">{name}</text>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>')
    for k in range(lo, hi + 1, max(1, nb // 8)):
        parts.append(f'<text x="{left + (k - lo) * bw:.1f}" y="{top + ph + 14}" text-anchor="middle">'
                     f'{edges[k]:.0f}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">document length (characters, '
                 f'log bins)</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{ymax:,}</text>'
                 f'<text x="{left - 6}" y="{top + ph}" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


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
    plot = svg_histogram(r["histograms"]) if r.get("histograms") else ""
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
