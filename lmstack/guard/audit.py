"""Append-only, hash-chained audit logs of guard decisions, tampering detectable: SQLite (WAL; one row per request,
:class:`SQLiteAudit`, chosen by a ``.db`` / ``.sqlite`` / ``.sqlite3`` path) or JSON Lines (:class:`AuditLog`).
:func:`open_audit` picks by the suffix. Neither raises on a write: a full disk, a read-only file or a database
another process holds locked costs the record (a logged warning and ``dropped`` + 1), never the request.

SQLite (the server's log, ``lmstack audit list|show|export``): one row per request --

    seq, id (request id), ts, key_id (SHA-256 prefix of the API key), model, route, action (strongest),
    rails (JSON: stage, rail, action, score, reason), latency_ms, input_sha256, output_sha256,
    input_text, output_text (redacted text, or raw text when the policy says audit.text: raw; NULL after
    audit.text_retention_days, or always with audit.text: none), prev, hash

``hash`` chains every column except the two text columns (so the retention purge leaves the chain whole, and
the content hashes still prove what was said): ``hash = sha256(prev || "\n" || canonical(row minus hash, texts))``.
Writers in several threads or processes append inside ``BEGIN IMMEDIATE`` (read the last hash, insert, commit),
so the chain stays linear; a writer that cannot get the lock within ``busy_timeout_ms`` drops its record.

JSON Lines (the original format, kept for ``.jsonl`` paths):

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
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lmstack.guard.audit")
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

        self.dropped = 0

    def append(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Append one record; None (a logged warning) when it cannot be written."""
        with self._lock:
            rec = {"seq": self._seq, "ts": round(time.time(), 3), **event, "prev": self._prev}
            rec["hash"] = chain_hash(self._prev, rec)
            line = canonical(rec) + b"\n"
            try:
                with open(self.path, "ab") as f:  # one write of one line: O_APPEND keeps lines whole
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                self.dropped += 1
                log.warning("audit log %s: record not written (%s); the request goes on", self.path, e)
                return None
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


# ------------------------------------------------------------------------------------------------ SQLite
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
COLUMNS = ("seq", "id", "ts", "key_id", "model", "route", "action", "rails", "latency_ms", "input_sha256",
           "output_sha256", "input_text", "output_text", "prev", "hash")
TEXT_COLUMNS = ("input_text", "output_text")
_SCHEMA = """CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, id TEXT, ts REAL NOT NULL, key_id TEXT, model TEXT, route TEXT, action TEXT NOT NULL,
    rails TEXT NOT NULL, latency_ms REAL, input_sha256 TEXT, output_sha256 TEXT, input_text TEXT, output_text TEXT,
    prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts);
CREATE INDEX IF NOT EXISTS audit_id ON audit(id);"""


def row_hash(prev: str, row: dict[str, Any]) -> str:
    """The chain hash of a row: every column but ``hash`` and the (purgeable) text columns."""
    body = {k: row.get(k) for k in COLUMNS if k not in ("hash",) + TEXT_COLUMNS}
    return hashlib.sha256(prev.encode("ascii") + b"\n" + canonical(body)).hexdigest()


def is_sqlite(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SQLITE_SUFFIXES)


def _connect(path: Path, timeout_ms: int):
    import sqlite3

    con = sqlite3.connect(str(path), timeout=timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    con.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
    return con


class SQLiteAudit:
    """One row per request in a SQLite database in WAL mode (module docstring). ``text_retention_days``: the
    text columns of older rows are set to NULL (checked at open and every 500 writes); None keeps them."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout_ms: int = 1000,
                 text_retention_days: float | None = None):
        import sqlite3

        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.text_retention_days = text_retention_days
        self.dropped = 0
        self._lock = threading.Lock()
        self._writes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = None
        try:
            con = self._con = _connect(self.path, busy_timeout_ms)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            from lmstack.errors import DataError

            raise DataError(f"{self.path}: cannot open the audit database ({e})") from None
        self.purge()

    def append(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Append one row (``event``: the :data:`COLUMNS` but seq / ts / prev / hash; ``rails`` a list). None,
        with a logged warning, when the database is locked past the timeout, full or unwritable."""
        import sqlite3

        row = {k: event.get(k) for k in COLUMNS}
        row["ts"] = round(float(event.get("ts") or time.time()), 3)
        row["rails"] = json.dumps(event.get("rails") or [], ensure_ascii=False, sort_keys=True)
        row["action"] = event.get("action") or "allow"
        with self._lock:
            con = self._con
            try:
                con.execute("BEGIN IMMEDIATE")  # the write lock first: the last hash cannot change under us
                try:
                    last = con.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                    row["seq"] = (last[0] + 1) if last else 0
                    row["prev"] = last[1] if last else GENESIS
                    row["hash"] = row_hash(row["prev"], row)
                    con.execute(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                                [row[k] for k in COLUMNS])
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                self.dropped += 1
                log.warning("audit database %s: record %s not written (%s); the request goes on", self.path,
                            row.get("id") or "", e)
                return None
            self._writes += 1
        if self._writes % 500 == 0:
            self.purge()
        return row

    def purge(self) -> int:
        """Clear the text columns of rows older than the retention; the number of rows cleared (0 on error)."""
        import sqlite3

        if self.text_retention_days is None:
            return 0
        cutoff = time.time() - self.text_retention_days * 86400
        with self._lock:
            try:
                cur = self._con.execute("UPDATE audit SET input_text = NULL, output_text = NULL WHERE ts < ? AND "
                                        "(input_text IS NOT NULL OR output_text IS NOT NULL)", (cutoff,))
                return cur.rowcount
            except sqlite3.Error as e:
                log.warning("audit database %s: retention purge failed (%s)", self.path, e)
                return 0

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def open_audit(path: str | os.PathLike, **kw: Any) -> "AuditLog | SQLiteAudit":
    """:class:`SQLiteAudit` for a ``.db`` / ``.sqlite`` / ``.sqlite3`` path (``kw``: its options), else the JSON
    Lines :class:`AuditLog` (no options)."""
    return SQLiteAudit(path, **kw) if is_sqlite(path) else AuditLog(path)


def read_rows(path: str | os.PathLike, *, limit: int | None = None, since: float | None = None,
              action: str | None = None, request_id: str | None = None, newest_first: bool = False) -> list[dict]:
    """Rows of an audit database as dicts (``rails`` decoded), oldest first unless ``newest_first``. The file is
    opened read-only: a query never writes to it."""
    import sqlite3

    p = Path(path)
    if not p.is_file():
        from lmstack.errors import DataError

        raise DataError(f"{p}: audit database not found")
    where, args = [], []
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
    if action:
        where.append("action = ?")
        args.append(action)
    if request_id:
        where.append("(id = ? OR CAST(seq AS TEXT) = ?)")
        args += [request_id, request_id]
    q = f"SELECT {', '.join(COLUMNS)} FROM audit" + (f" WHERE {' AND '.join(where)}" if where else "")
    q += f" ORDER BY seq {'DESC' if newest_first else 'ASC'}" + (f" LIMIT {int(limit)}" if limit else "")
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            rows = con.execute(q, args).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        from lmstack.errors import DataError

        raise DataError(f"{p}: not an lmstack audit database ({e})") from None
    out = []
    for r in rows:
        d = dict(zip(COLUMNS, r))
        try:
            d["rails"] = json.loads(d["rails"])
        except (TypeError, ValueError):
            pass
        out.append(d)
    return out


def verify_db(path: str | os.PathLike, expected_head: str | None = None) -> VerifyResult:
    """Walk the SQLite chain in ``seq`` order; the first row whose seq, prev or hash does not follow is reported
    (``line``: its seq + 1)."""
    prev, n = GENESIS, 0
    for row in read_rows(path):
        raw = dict(row, rails=json.dumps(row["rails"], ensure_ascii=False, sort_keys=True))
        if row["seq"] != n:
            return VerifyResult(False, n, prev, f"seq {row['seq']}, expected {n} (a row was removed)", n + 1)
        if row["prev"] != prev:
            return VerifyResult(False, n, prev, "prev does not match the previous row's hash", n + 1)
        if row["hash"] != row_hash(prev, raw):
            return VerifyResult(False, n, prev, "hash does not match the row (the row was edited)", n + 1)
        prev, n = row["hash"], n + 1
    if expected_head is not None and prev != expected_head:
        return VerifyResult(False, n, prev, "the last hash is not the expected head (rows were cut from the end)", n)
    return VerifyResult(True, n, prev)
