"""``lmstack audit list|show|export|verify``: query the guard's SQLite audit log (one row per request;
:mod:`lmstack.guard.audit`). The database is opened read-only."""

from __future__ import annotations

import json
from typing import Optional

import typer

audit_app = typer.Typer(help="Query the guard's audit log (SQLite, one row per request; docs/guard.md).",
                        no_args_is_help=True)
DB = typer.Argument(..., help="The audit database (the policy's audit.path, e.g. runs/support/audit.db).")


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")


def _since(value: Optional[str]) -> Optional[float]:
    """``--since``: seconds ago (``3600``, ``90m``, ``24h``, ``7d``) or an ISO date/time (UTC when no zone)."""
    if value is None:
        return None
    import time
    from datetime import datetime, timezone

    v = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if v[-1:] in units and v[:-1].replace(".", "", 1).isdigit():
            return time.time() - float(v[:-1]) * units[v[-1]]
        if v.replace(".", "", 1).isdigit():
            return time.time() - float(v)
        dt = datetime.fromisoformat(v)
        return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    except ValueError:
        raise typer.BadParameter("seconds ago (3600, 90m, 24h, 7d) or an ISO time (2026-01-31T12:00)",
                                 param_hint="--since") from None


def _when(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@audit_app.command("list")
def list_cmd(db: str = DB, limit: int = typer.Option(20, "--limit", "-n", min=1, max=1_000_000),
             action: Optional[str] = typer.Option(None, "--action", help="Only rows whose strongest action is "
                                                  "this (block, redact, warn, log, allow)."),
             since: Optional[str] = typer.Option(None, "--since", help="Rows from then on: 3600, 90m, 24h, 7d or "
                                                 "an ISO time."),
             as_json: bool = typer.Option(False, "--json", help="One JSON object per row instead of a table.")) -> None:
    """The newest rows: time, request id, key id, model, action, the rails that acted, latency."""
    from lmstack.guard.audit import read_rows

    rows = read_rows(db, limit=limit, since=_since(since), action=action, newest_first=True)
    for r in rows:
        if as_json:
            typer.echo(json.dumps(r, ensure_ascii=False))
            continue
        rails = ",".join(f"{x['rail']}:{x['action']}" for x in r["rails"]) or "-"
        lat = f"{r['latency_ms']:.0f}ms" if r["latency_ms"] is not None else "-"
        typer.echo(f"{r['seq']:>6} {_when(r['ts'])} {r['id'] or '-':<28} {r['key_id'] or '-':<16} "
                   f"{(r['model'] or '-')[:24]:<24} {r['action']:<6} {lat:>7} {rails}")


@audit_app.command("show")
def show_cmd(db: str = DB, row: str = typer.Argument(..., help="A request id or a row number (seq).")) -> None:
    """One row as JSON, with every rail's score and reason."""
    from lmstack.errors import DataError
    from lmstack.guard.audit import read_rows

    rows = read_rows(db, request_id=row)
    if not rows:
        raise DataError(f"{db}: no row with request id or seq {row!r}")
    for r in rows:
        typer.echo(json.dumps({**r, "time": _when(r["ts"])}, ensure_ascii=False, indent=2))


@audit_app.command("export")
def export_cmd(db: str = DB, fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl or csv."),
               out: Optional[str] = typer.Option(None, "--out", "-o", help="Output file (default: stdout)."),
               since: Optional[str] = typer.Option(None, "--since", help="Rows from then on (as for list)."),
               action: Optional[str] = typer.Option(None, "--action")) -> None:
    """Every row (oldest first) as JSON Lines or CSV (rails as a JSON string in CSV)."""
    import csv
    import sys

    from lmstack.guard.audit import COLUMNS, read_rows

    if fmt not in ("jsonl", "csv"):
        raise typer.BadParameter("jsonl or csv", param_hint="--format")
    rows = read_rows(db, since=_since(since), action=action)
    f = open(out, "w", encoding="utf-8", newline="") if out else sys.stdout
    try:
        if fmt == "jsonl":
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS))
            w.writeheader()
            for r in rows:
                w.writerow({**r, "rails": json.dumps(r["rails"], ensure_ascii=False)})
    finally:
        if out:
            f.close()
    if out:
        typer.echo(f"{len(rows)} rows -> {out}", err=True)


@audit_app.command("verify")
def verify_cmd(db: str = DB, head: Optional[str] = typer.Option(None, "--head", help="The last hash recorded "
                                                                 "elsewhere (detects rows cut from the end).")) -> None:
    """Check the hash chain; exit 1 naming the first bad row (as `lmstack guard verify-log`)."""
    from lmstack.cli.guard import verify_log_cmd

    verify_log_cmd(db, head)
