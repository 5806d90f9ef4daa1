"""Reading task data: JSONL / CSV records with their line numbers, and field access with errors that name
the task, the file and the line.

Lines that are not valid JSON are counted, reported in the results (``skipped``) and left out; a record
that lacks a field the task needs stops the run with ``task T: FILE:LINE: ...`` so the YAML or the data can
be fixed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.utils.io import iter_jsonl_lines


@dataclass
class Record:
    data: dict[str, Any]
    file: str
    line: int

    def get(self, task: str, key: str) -> Any:
        if key not in self.data or self.data[key] is None:
            present = ", ".join(map(str, self.data)) or "none"
            raise DataError(f"task {task}: {self.file}:{self.line}: missing field {key!r} "
                            f"(fields present: {present}); fix the data or the task's *_field setting")
        return self.data[key]


@dataclass
class Records:
    items: list[Record]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # "file:line: reason", the first few


def read_records(path: str | Path, task: str, fmt: str = "auto", csv_header: bool = True,
                 csv_columns: list[str] | None = None) -> Records:
    """All records of a JSONL or CSV file (``fmt="auto"`` picks by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task {task}: data file {path} not found (the path is relative to the task YAML)")
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl"
    out = Records([])
    if fmt == "jsonl":
        for i, obj in iter_jsonl_lines(path, lambda i, why: _skip(out, f"{path}:{i}: {why}")):
            if not isinstance(obj, dict):
                _skip(out, f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
                continue
            out.items.append(Record(obj, str(path), i))
    else:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delim)
            header = None
            if csv_header:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"task {task}: {path}: empty CSV file")
                header = [h.strip() for h in header]
            else:
                header = csv_columns
            for row in reader:
                line = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    _skip(out, f"{path}:{line}: {len(row)} columns, expected {len(header)}")
                    continue
                out.items.append(Record(dict(zip(header, row)), str(path), line))
    if not out.items:
        raise DataError(f"task {task}: {path}: no usable records"
                        + (f" ({out.skipped} malformed, e.g. {out.skipped_examples[0]})" if out.skipped else ""))
    return out


def _skip(out: Records, reason: str) -> None:
    out.skipped += 1
    if len(out.skipped_examples) < 5:
        out.skipped_examples.append(reason)


_TEMPLATES: dict[str, Any] = {}


def render(template: str, rec: Record, task: str, **extra: Any) -> str:
    """Render a Jinja2 prompt template over a record; an unknown variable names the task, file and line. Task YAMLs
    come from strangers: the template runs in Jinja's immutable sandbox (no attribute walks to ``__class__``,
    ``os`` or ``subprocess``), as transformers renders chat templates."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = _TEMPLATES.get(template)
    if t is None:
        env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            t = _TEMPLATES[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"task {task}: prompt template line {e.lineno}: {e.message}") from None
    try:
        return t.render(**rec.data, **extra)
    except jinja2.exceptions.SecurityError as e:
        raise DataError(f"task {task}: prompt template refused by the sandbox ({e})") from None
    except jinja2.UndefinedError as e:
        raise DataError(f"task {task}: {rec.file}:{rec.line}: prompt template uses a field the record lacks "
                        f"({e.message}); fields present: {', '.join(map(str, rec.data))}") from None
