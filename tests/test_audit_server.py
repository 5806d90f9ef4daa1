"""`lmstack serve --guard` live on 127.0.0.1 with a SQLite audit log: 64 concurrent requests give exactly 64
rows (one per request, one linear chain); a locked database costs the row, never the request; /metrics counts
every rail decision."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import re
import sqlite3
import time

import httpx
import openai
import pytest
import torch

from tests.serve_fixtures import LiveServer, shared_model_dir

torch.set_num_threads(2)
KEY = "sk-audit-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import lmstack.serve.llm as L
    from lmstack.guard import Guard, load_policy
    from lmstack.guard.asgi import GuardMiddleware
    from lmstack.serve.api.app import create_app

    pol = load_policy()  # the shipped policy, made cheap: no classifiers to train, no rate limit for 64 at once
    pol.input.injection.classifier = False
    pol.input.topic = None
    pol.output.toxicity.classifier = False
    pol.rate_limit = None
    pol.audit.path = str(tmp_path_factory.mktemp("audit") / "audit.db")
    pol.audit.busy_timeout_ms = 100
    llm = L.load(shared_model_dir(), max_num_seqs=16)
    app = create_app(llm, api_key=KEY, served_model_name="tiny")
    with LiveServer(GuardMiddleware(app, Guard(pol), api_key=KEY)) as s:
        s.db = pol.audit.path
        yield s


def _rows(db) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    finally:
        con.close()


def _metric(url: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(r"^lmstack_guard_decisions_total\{" + re.escape(want) + r"\} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_64_concurrent_requests_give_64_rows(server):
    from lmstack.guard.audit import read_rows, verify_db

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    before = _rows(server.db)
    pii_before = _metric(server.url, stage="input", rail="pii", action="redact")

    def one(i: int) -> str:
        msg = f"order {i}: my card 4111 1111 1111 1111" if i % 2 else f"where is order {i}?"
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": msg}], max_tokens=2,
                                           temperature=0, stream=bool(i % 3 == 0))
        return "stream" if i % 3 == 0 else r.choices[0].finish_reason

    with cf.ThreadPoolExecutor(64) as ex:
        results = list(ex.map(one, range(64)))
    assert len(results) == 64
    # a row is written when its request's handler finishes, which can be just after the client has read the last
    # byte of a stream: wait for the stragglers (bounded) instead of racing them
    deadline = time.monotonic() + 60
    while _rows(server.db) - before < 64 and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = read_rows(server.db)[before:]
    assert _rows(server.db) - before == 64 and len({r["id"] for r in rows}) == 64
    assert verify_db(server.db).ok
    assert all(r["model"] == "tiny" and r["key_id"] and r["input_sha256"] and r["latency_ms"] > 0 for r in rows)
    assert sum(r["action"] == "redact" for r in rows) == 32  # the odd requests carried a card number
    assert all("4111" not in (r["input_text"] or "") for r in rows)
    # /metrics counted the same decisions
    assert _metric(server.url, stage="input", rail="pii", action="redact") - pii_before == 32


def test_locked_database_the_request_still_succeeds(server, caplog):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    before = _rows(server.db)
    holder = sqlite3.connect(server.db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger="lmstack.guard.audit"):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                               max_tokens=2, temperature=0)
            # the row is written after the answer went out: hold the lock until the writer has given up
            deadline = time.monotonic() + 60
            while "not written" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "not written" in caplog.text and "locked" in caplog.text
    assert _rows(server.db) == before  # the row was dropped, not half-written
