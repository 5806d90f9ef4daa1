"""The screen app's part of the summary and of ``report.html``: the systems table (classifier-only, LLM-only,
cascade), the threshold and band chosen on dev, and the commands to use the bundle."""

from __future__ import annotations

import html
from typing import Any

from lmstack.pipeline.report import fmt, table
from lmstack.pipeline.runner import PipelineResult

SYSTEMS = (("classifier", "classifier only (int8)"), ("llm_only", "LLM only"), ("cascade", "cascade"))
COLUMNS = ("system", "items", "accuracy", "recall", "FPR", "precision", "p50 ms", "p99 ms", "items/s")


def data_row(m: dict[str, Any]) -> str:
    return ", ".join(f"{s} {fmt((m.get(s) or {}).get('n'))} ({fmt((m.get(s) or {}).get('fraud'))} fraud)"
                     for s in ("train", "dev", "test"))


def classifier_row(m: dict[str, Any]) -> str:
    return (f"{fmt(m.get('train_records'))} items; dev accuracy {fmt(m.get('accuracy'))}; "
            f"{fmt(m.get('train_seconds'))} s")


def eval_row(m: dict[str, Any]) -> str:
    sy = m.get("systems") or {}
    parts = [f"threshold {fmt(m.get('threshold'))}; LLM share {fmt(m.get('llm_share'))}"]
    for key, name in SYSTEMS:
        q = (sy.get(key) or {}).get("quality")
        if q:
            parts.append(f"{key} recall {fmt(q.get('recall'))} FPR {fmt(q.get('fpr'))}")
    return "; ".join(parts)


def system_rows(m: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for key, name in SYSTEMS:
        s = (m.get("systems") or {}).get(key)
        if not s:
            continue
        q, lat = s["quality"], s.get("latency_ms") or {}
        rows.append((name, fmt(q["n"]), fmt(q["accuracy"]), fmt(q["recall"]), fmt(q["fpr"]), fmt(q["precision"]),
                     fmt(lat.get("p50")), fmt(lat.get("p99")), fmt(s.get("items_per_s"))))
    for const in ("legit", "fraud"):  # the control: the band decided by a constant instead of the LLM
        q = m.get(f"band_all_{const}")
        if q and "cascade" in (m.get("systems") or {}):
            rows.append((f"control: band -> {const}", fmt(q["n"]), fmt(q["accuracy"]), fmt(q["recall"]), fmt(q["fpr"]),
                         fmt(q["precision"]), "-", "-", "-"))
    return rows


def print_tables(res: PipelineResult, console: Any) -> None:
    from rich.table import Table

    m = res.summary("eval")
    if not m:
        return
    t = Table(title=f"screen: test items (threshold {fmt(m['threshold'])} for dev FPR <= {m['target_fpr']}; "
                    f"LLM band {m['band']}, share {m['llm_share']})")
    for c in COLUMNS:
        t.add_column(c)
    for r in system_rows(m):
        t.add_row(*r)
    console.print(t)


def html_sections(res: PipelineResult) -> list[str]:
    m = res.summary("eval")
    if not m:
        return []
    return [f"<h2>Screen</h2><p>threshold {html.escape(fmt(m['threshold']))} (dev FPR &le; {m['target_fpr']}), "
            f"LLM band {html.escape(str(m['band']))}, share of test items sent to the LLM {m['llm_share']}</p>"
            + table(list(COLUMNS), system_rows(m))]


def next_commands(res: PipelineResult) -> list[str]:
    b = res.summary("bundle").get("bundle")
    return [f'lmstack screen score {b} "amount 900.00 USD; category gift_cards; hour 02; new device; foreign '
            f'country; account age 3 days; message: read me the codes"'] if b else []
