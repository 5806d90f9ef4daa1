"""Append-only, hash-chained audit log (JSON Lines) of guard decisions; tampering is detectable.

Each line is one JSON object. Its ``hash`` is the SHA-256 of the previous line's hash and the canonical JSON of
the record without ``hash`` (sorted keys, no spaces, UTF-8)::

    hash_i = sha256( hash_{i-1} || "\\n" || canonical(record_i minus "hash") ),   hash_0's predecessor = "0" * 64

and each record repeats ``prev`` (= hash_{i-1}) and ``seq`` (= i), so editing, deleting, inserting or reordering a
line breaks the chain at that line (:func:`verify_log`; ``lmstack guard verify-log FILE``). Truncating the *end* of
the file is only detectable against a hash kept elsewhere: :func:`verify_log` returns the last hash (the "head")
to record out of band. Records hold what was decided and why -- rail, action, score, reason -- and at most
``max_text_chars`` of the text *after* PII redaction, never raw PII.

A log the process did not write is untrusted: lines are capped (:data:`MAX_LINE_BYTES`) when verifying.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MAX_LINE_BYTES = 1 << 20


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(prev.encode("ascii") + b"\n" + canonical(body)).hexdigest()


class AuditLog:
    """Appends chained records to ``path`` (created if missing; an existing log is continued after its last
    line, whose hash is read, not trusted blindly: :func:`verify_log` checks a whole file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._prev, self._seq = GENESIS, 0
        if self.path.is_file() and self.path.stat().st_size:
            last = _last_line(self.path)
            try:
                rec = json.loads(last)
                self._prev, self._seq = str(rec["hash"]), int(rec["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                from lmstack.errors import DataError

                raise DataError(f"{self.path}: the last line is not an audit record; run `lmstack guard verify-log "
                                f"{self.path}` and start a new log") from None

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            rec = {"seq": self._seq, "ts": round(time.time(), 3), **event, "prev": self._prev}
            rec["hash"] = chain_hash(self._prev, rec)
            line = canonical(rec) + b"\n"
            with open(self.path, "ab") as f:  # one write of one line: O_APPEND keeps lines whole
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._prev, self._seq = rec["hash"], self._seq + 1
            return rec


def _last_line(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - MAX_LINE_BYTES))
        lines = f.read().rstrip(b"\n").split(b"\n")
    return lines[-1]


@dataclass
class VerifyResult:
    ok: bool
    records: int
    head: str  # the last good hash (record it elsewhere to detect truncation later)
    error: str = ""
    line: int = 0  # 1-based line of the first problem (0: none)


def verify_log(path: str | os.PathLike, expected_head: str | None = None) -> VerifyResult:
    """Walk the chain; the first line whose ``seq``, ``prev`` or ``hash`` does not follow is reported."""
    p = Path(path)
    prev, n = GENESIS, 0
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if len(raw) > MAX_LINE_BYTES:
                return VerifyResult(False, n, prev, f"line over {MAX_LINE_BYTES} bytes", lineno)
            if not raw.strip():
                return VerifyResult(False, n, prev, "empty line", lineno)
            try:
                rec = json.loads(raw)
            except ValueError:
                return VerifyResult(False, n, prev, "not JSON", lineno)
            if not isinstance(rec, dict):
                return VerifyResult(False, n, prev, "not a JSON object", lineno)
            if rec.get("seq") != n:
                return VerifyResult(False, n, prev, f"seq {rec.get('seq')!r}, expected {n} (a line was removed, "
                                    "inserted or moved)", lineno)
            if rec.get("prev") != prev:
                return VerifyResult(False, n, prev, "prev does not match the previous line's hash", lineno)
            if rec.get("hash") != chain_hash(prev, rec):
                return VerifyResult(False, n, prev, "hash does not match the record (the line was edited)", lineno)
            prev, n = rec["hash"], n + 1
    if expected_head is not None and prev != expected_head:
        return VerifyResult(False, n, prev, "the last hash is not the expected head (lines were cut from the end)", n)
    return VerifyResult(True, n, prev)
