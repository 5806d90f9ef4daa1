"""The guard's SQLite audit log (lmstack.guard.audit.SQLiteAudit): one row per request, hash-chained, safe under
concurrent writers, degrading to a logged warning (never an exception) when the database is locked or full;
`lmstack audit list|show|export|verify`. The live-server checks are in tests/test_audit_server.py."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sqlite3
import threading

import pytest

from lmstack.guard.audit import GENESIS, SQLiteAudit, read_rows, verify_db


def _row(i: int, **kw) -> dict:
    return {"id": f"req-{i}", "key_id": "k", "model": "m", "route": "/v1/chat/completions", "action": "allow",
            "rails": [{"stage": "input", "rail": "input.pii", "action": "redact", "score": 1.0, "reason": "PII"}],
            "latency_ms": 1.5, "input_sha256": "a" * 64, "output_sha256": "b" * 64, "input_text": f"in {i}",
            "output_text": f"out {i}", **kw}


def _expected_hash(prev: str, row: dict) -> str:
    """The chain hash recomputed here: every column but hash and the two text columns, canonical JSON."""
    cols = ("seq", "id", "ts", "key_id", "model", "route", "action", "rails", "latency_ms", "input_sha256",
            "output_sha256", "prev")
    body = {c: row[c] for c in cols}
    body["rails"] = json.dumps(row["rails"], ensure_ascii=False, sort_keys=True)
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(prev.encode() + b"\n" + blob).hexdigest()


def test_rows_chain_and_wal(tmp_path):
    db = tmp_path / "audit.db"
    a = SQLiteAudit(db)
    for i in range(5):
        assert a.append(_row(i)) is not None
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    rows = read_rows(db)
    assert [r["seq"] for r in rows] == list(range(5)) and rows[0]["prev"] == GENESIS
    prev = GENESIS
    for r in rows:
        assert r["prev"] == prev and r["hash"] == _expected_hash(prev, r)
        prev = r["hash"]
    v = verify_db(db)
    assert v.ok and v.records == 5 and v.head == prev
    SQLiteAudit(db).append(_row(5))  # a second writer continues the same chain
    assert verify_db(db).ok and verify_db(db).records == 6


def test_tampering_is_found_at_its_row(tmp_path):
    db = tmp_path / "audit.db"
    a = SQLiteAudit(db)
    for i in range(4):
        a.append(_row(i))
    head = verify_db(db).head
    a.close()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("UPDATE audit SET action = 'allow', rails = '[]' WHERE seq = 2")
    con.close()
    r = verify_db(db)
    assert not r.ok and r.line == 3 and "edited" in r.error
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("DELETE FROM audit WHERE seq >= 2")
    con.close()
    assert verify_db(db).ok and not verify_db(db, head).ok  # cut from the end: only the head kept elsewhere tells


def test_retention_clears_text_and_keeps_the_chain(tmp_path):
    db = tmp_path / "audit.db"
    a = SQLiteAudit(db, text_retention_days=1)
    a.append(_row(0, ts=1000.0))  # 1970: long past the retention
    a.append(_row(1))
    assert a.purge() == 1
    rows = read_rows(db)
    assert rows[0]["input_text"] is None and rows[0]["output_text"] is None and rows[0]["input_sha256"] == "a" * 64
    assert rows[1]["input_text"] == "in 1"
    assert verify_db(db).ok


def test_concurrent_writers_keep_one_linear_chain(tmp_path):
    db = tmp_path / "audit.db"
    writers = [SQLiteAudit(db, busy_timeout_ms=30_000) for _ in range(4)]  # four connections, as four processes

    def work(w, base):
        for i in range(25):
            assert w.append(_row(base + i)) is not None

    ts = [threading.Thread(target=work, args=(w, 100 * k)) for k, w in enumerate(writers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    v = verify_db(db)
    assert v.ok and v.records == 100
    assert len({r["id"] for r in read_rows(db)}) == 100


def test_locked_database_drops_the_row_with_a_warning(tmp_path, caplog):
    db = tmp_path / "audit.db"
    a = SQLiteAudit(db, busy_timeout_ms=50)
    a.append(_row(0))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger="lmstack.guard.audit"):
            assert a.append(_row(1)) is None  # no exception
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert a.dropped == 1 and "not written" in caplog.text and "locked" in caplog.text
    assert a.append(_row(2)) is not None and verify_db(db).records == 2


def test_full_database_drops_the_row_with_a_warning(tmp_path, caplog):
    db = tmp_path / "audit.db"
    a = SQLiteAudit(db)
    a.append(_row(0))
    pages = a._con.execute("PRAGMA page_count").fetchone()[0]
    a._con.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full: no page can be added
    with caplog.at_level(logging.WARNING, logger="lmstack.guard.audit"):
        assert a.append(_row(1, input_text="x" * 200_000)) is None
    assert a.dropped == 1 and "full" in caplog.text


def test_unwritable_jsonl_log_is_a_warning_too(tmp_path, caplog):
    from lmstack.guard.audit import AuditLog

    log = AuditLog(tmp_path / "a.jsonl")
    log.path = tmp_path / "no-such-dir" / "a.jsonl"
    with caplog.at_level(logging.WARNING, logger="lmstack.guard.audit"):
        assert log.append({"stage": "input"}) is None
    assert log.dropped == 1


def test_audit_cli_list_show_export_verify(tmp_path, capsys):
    from lmstack.cli import main

    db = tmp_path / "audit.db"
    a = SQLiteAudit(db)
    for i in range(3):
        a.append(_row(i, action="block" if i == 1 else "allow"))
    capsys.readouterr()
    assert main(["audit", "list", str(db), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in rows] == [2, 1, 0]  # newest first
    assert main(["audit", "list", str(db), "--action", "block"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "req-1" in out[0] and "input.pii:redact" in out[0]
    assert main(["audit", "show", str(db), "req-2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == "req-2" and shown["rails"][0]["score"] == 1.0
    assert main(["audit", "export", str(db), "--format", "csv"]) == 0
    got = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [g["id"] for g in got] == ["req-0", "req-1", "req-2"] and json.loads(got[0]["rails"])[0]["rail"] == "input.pii"
    out_file = tmp_path / "x.jsonl"
    assert main(["audit", "export", str(db), "-o", str(out_file)]) == 0
    assert [json.loads(x)["seq"] for x in out_file.read_text().splitlines()] == [0, 1, 2]
    assert main(["audit", "verify", str(db)]) == 0
    assert main(["guard", "verify-log", str(db)]) == 0
    # bad input: one line, exit 2
    assert main(["audit", "show", str(db), "nope"]) == 2
    assert main(["audit", "list", str(tmp_path / "missing.db")]) == 2
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    assert main(["audit", "list", str(tmp_path / "junk.db")]) == 2
    assert main(["audit", "list", str(db), "--since", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.parametrize("text_mode", ["redacted", "raw", "none"])
def test_guard_rows_hold_hashes_and_the_text_the_policy_allows(tmp_path, text_mode):
    from lmstack.guard import Guard, GuardContext, load_policy

    pol = load_policy()
    pol.input.injection.classifier = False
    pol.input.topic = None
    pol.output.toxicity.classifier = False
    pol.rate_limit = None
    pol.audit.path = str(tmp_path / "audit.db")
    pol.audit.text = text_mode
    g = Guard(pol)
    raw = "My card 4111 1111 1111 1111 was charged twice"
    rec = g.begin(key="sk-secret", model="tiny")
    v = g.check_input(raw, GuardContext(key="sk-secret", record=rec))
    g.check_output("We refunded it.", GuardContext(record=rec))
    g.finish(rec)
    g.finish(rec)  # once only
    rows = read_rows(pol.audit.path)
    assert len(rows) == 1
    r = rows[0]
    assert r["key_id"] == hashlib.sha256(b"sk-secret").hexdigest()[:16] and "sk-secret" not in json.dumps(r)
    assert r["input_sha256"] == hashlib.sha256(raw.encode()).hexdigest()
    assert r["output_sha256"] == hashlib.sha256(b"We refunded it.").hexdigest()
    assert r["action"] == "redact" and [x["rail"] for x in r["rails"]] == ["input.pii"] and r["latency_ms"] >= 0
    want = {"redacted": v.text, "raw": raw, "none": None}[text_mode]
    assert r["input_text"] == want
