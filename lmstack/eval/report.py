"""Reports of an evaluation run (Markdown and a self-contained HTML page with a plot) and run comparison.

``compare_runs(A, B)`` lines up every (task, metric) the two runs share and gives B - A; it also says when
the runs used different task data (different data sha256), which makes a delta meaningless.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.utils.io import atomic_write_text, read_json

LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "nll_per_token"}


def load_results(path: str | Path) -> dict[str, Any]:
    """A run directory or its results.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise DataError(f"{path}: no results.json found (pass an `lmstack eval --out` directory)")
    r = read_json(p)
    if not isinstance(r, dict) or "tasks" not in r:
        raise DataError(f"{p}: not an lmstack eval results file (no 'tasks' key)")
    return r


def metric_rows(results: dict) -> list[tuple[str, str, float, int]]:
    """(task, metric, value, n) for every metric of every task."""
    rows = []
    for name, t in results["tasks"].items():
        for m, v in t["metrics"].items():
            rows.append((name, m, float(v), int(t.get("n", 0))))
    return rows


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def to_markdown(results: dict) -> str:
    m = results["model"]
    lines = [f"# Evaluation: {Path(m['path']).name}", "",
             f"- model: `{m['path']}` (weights sha256 `{m['weights_sha256'][:16]}`, {m['parameters']:,} parameters, "
             f"{m['dtype']} on {m['device']})"]
    if results.get("adapter"):
        lines.append(f"- adapter: `{results['adapter']['path']}` (sha256 `{results['adapter']['sha256'][:16]}`)")
    lines += [f"- lmstack {results['lmstack_version']}, {results['created']}"
              + (f", limit {results['limit']}" if results.get("limit") else ""), "",
              "| task | type | metric | value | n | data sha256 |", "|---|---|---|---:|---:|---|"]
    for name, t in results["tasks"].items():
        for k, v in t["metrics"].items():
            lines.append(f"| {name} | {t['type']} | {k} | {_fmt(v)} | {t.get('n', '')} | `{t['data_sha256'][:12]}` |")
    skipped = [(n, t) for n, t in results["tasks"].items() if t.get("skipped")]
    if skipped:
        lines += ["", "## Skipped malformed records", ""]
        for n, t in skipped:
            lines.append(f"- {n}: {t['skipped']} skipped, e.g. {'; '.join(t.get('skipped_examples', [])[:3])}")
    return "\n".join(lines) + "\n"


def _plot_png(results: dict) -> str | None:
    """A horizontal bar chart of every bounded metric (accuracy-like in [0, 1], BLEU/chrF scaled /100)."""
    from lmstack.utils.plot import new_figure, png_bytes

    labels, vals = [], []
    for name, metric, v, _ in metric_rows(results):
        if metric in LOWER_IS_BETTER:
            continue
        scaled = v / 100 if metric in ("bleu", "chrf") else v
        labels.append(f"{name} {metric}" + (" /100" if metric in ("bleu", "chrf") else ""))
        vals.append(scaled)
    if not vals:
        return None
    fig = new_figure(7, 0.35 * len(vals) + 1)
    ax = fig.subplots()
    ax.barh(range(len(vals)), vals, color="#4C72B0")
    ax.set_yticks(range(len(vals)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    return base64.b64encode(png_bytes(fig)).decode()


def to_html(results: dict) -> str:
    m = results["model"]
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(n)}</td><td>{esc(results['tasks'][n]['type'])}</td><td>{esc(k)}</td>"
        f"<td class=num>{_fmt(v)}</td><td class=num>{c}</td></tr>" for n, k, v, c in metric_rows(results))
    png = _plot_png(results)
    img = f'<img alt="metrics" src="data:image/png;base64,{png}">' if png else ""
    prov = "".join(f"<tr><td>{esc(n)}</td><td><code>{esc(t['data'])}</code></td><td><code>{t['data_sha256'][:16]}"
                   f"</code></td><td class=num>{t.get('seconds', '')}</td></tr>" for n, t in results["tasks"].items())
    adapter = (f"<p>adapter <code>{esc(results['adapter']['path'])}</code></p>" if results.get("adapter") else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>lmstack eval</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px}}th{{background:#f3f3f3}}.num{{text-align:right}}</style></head><body>
<h1>Evaluation: {esc(Path(m['path']).name)}</h1>
<p>model <code>{esc(m['path'])}</code> &mdash; weights sha256 <code>{m['weights_sha256'][:16]}</code>,
{m['parameters']:,} parameters, {esc(m['dtype'])} on {esc(m['device'])}; lmstack {esc(results['lmstack_version'])},
{esc(results['created'])}</p>{adapter}
<table><tr><th>task</th><th>type</th><th>metric</th><th>value</th><th>n</th></tr>{rows}</table>
{img}
<h2>Data</h2><table><tr><th>task</th><th>data</th><th>sha256</th><th>seconds</th></tr>{prov}</table>
</body></html>
"""


def write_reports(results: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    atomic_write_text(out / "report.md", to_markdown(results))
    atomic_write_text(out / "report.html", to_html(results))


def compare_runs(a: str | Path | dict, b: str | Path | dict) -> dict[str, Any]:
    """Deltas B - A for every (task, metric) in both runs, plus what is only in one and data mismatches."""
    ra = a if isinstance(a, dict) else load_results(a)
    rb = b if isinstance(b, dict) else load_results(b)
    va = {(n, k): v for n, k, v, _ in metric_rows(ra)}
    vb = {(n, k): v for n, k, v, _ in metric_rows(rb)}
    rows = []
    for key in [k for k in va if k in vb]:
        d = vb[key] - va[key]
        better = (d < 0) if key[1] in LOWER_IS_BETTER else (d > 0)
        rows.append({"task": key[0], "metric": key[1], "a": va[key], "b": vb[key], "delta": d,
                     "verdict": "same" if d == 0 else ("better" if better else "worse")})
    shared = [n for n in ra["tasks"] if n in rb["tasks"]]
    mismatch = [n for n in shared if ra["tasks"][n].get("data_sha256") != rb["tasks"][n].get("data_sha256")]
    n_mismatch = [n for n in shared if ra["tasks"][n].get("n") != rb["tasks"][n].get("n")]
    return {"rows": rows, "only_a": sorted({n for n, _ in va} - {n for n, _ in vb}),
            "only_b": sorted({n for n, _ in vb} - {n for n, _ in va}), "data_mismatch": mismatch,
            "n_mismatch": n_mismatch,
            "model_a": ra["model"]["path"], "model_b": rb["model"]["path"]}


def compare_markdown(cmp: dict) -> str:
    lines = [f"A: `{cmp['model_a']}`  B: `{cmp['model_b']}`", "",
             "| task | metric | A | B | B - A | |", "|---|---|---:|---:|---:|---|"]
    for r in cmp["rows"]:
        lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['a'])} | {_fmt(r['b'])} | {r['delta']:+.4f} | "
                     f"{r['verdict']} |")
    for key, label in (("only_a", "only in A"), ("only_b", "only in B")):
        if cmp[key]:
            lines.append(f"\n{label}: {', '.join(cmp[key])}")
    if cmp.get("n_mismatch"):
        lines.append(f"\nwarning: different numbers of examples (--limit?) for {', '.join(cmp['n_mismatch'])}")
    if cmp["data_mismatch"]:
        lines.append(f"\nwarning: task data differs between the runs for {', '.join(cmp['data_mismatch'])}")
    return "\n".join(lines) + "\n"
