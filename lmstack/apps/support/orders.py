"""The support desk's order database (SQLite) and its tools, as OpenAI function-tool schemas.

``recipes/data/shop/orders.jsonl`` (fictional, CC0, written by :func:`generate_orders`) is loaded into
``orders.sqlite`` with two tables::

    orders(order_id TEXT PRIMARY KEY, email TEXT, sku TEXT, product TEXT, status TEXT, eta TEXT)
    tickets(id INTEGER PRIMARY KEY, created TEXT, reason TEXT, intent TEXT, summary TEXT, transcript TEXT)

Every tool call is an OpenAI ``tool_calls`` item (``{"id", "type": "function", "function": {"name", "arguments"}}``)
whose arguments are checked against the tool's JSON schema before anything runs; the order tools need the order
number *and* the email on the order (nothing about an order is shown to someone who cannot name both).
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

from lmstack.errors import DataError

SHIPPED_ORDERS = Path(__file__).resolve().parents[3] / "recipes" / "data" / "shop" / "orders.jsonl"
STATUSES = ("processing", "shipped", "delivered", "cancelled")
ORDER_RE = r"LH-[0-9]{5}"
EMAIL_RE = r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,64}\.[A-Za-z]{2,10}"

_ORDER_ARGS = {"type": "object", "properties": {"order_id": {"type": "string", "pattern": f"^{ORDER_RE}$"},
                                                "email": {"type": "string", "pattern": f"^{EMAIL_RE}$"}},
               "required": ["order_id", "email"], "additionalProperties": False}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "order_status", "description": "Status and delivery date of an order",
                                      "parameters": _ORDER_ARGS}},
    {"type": "function", "function": {"name": "cancel_order", "description": "Cancel an order that has not shipped "
                                      "(only after the customer confirmed)", "parameters": _ORDER_ARGS}},
    {"type": "function", "function": {
        "name": "create_ticket", "description": "Hand the conversation to a person",
        "parameters": {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 64},
                                                        "intent": {"type": "string", "maxLength": 64},
                                                        "summary": {"type": "string", "maxLength": 2000}},
                       "required": ["reason", "summary"], "additionalProperties": False}}},
]
_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def generate_orders(products: list[dict[str, Any]], n: int = 60, seed: int = 21) -> list[dict[str, Any]]:
    """``n`` fictional orders over the catalog's products (deterministic in ``seed``)."""
    rng = random.Random(seed)
    first = ["anna", "ben", "chloe", "david", "emma", "li.na", "wang.wei", "zhang.min", "liu.yang", "chen.jing"]
    out = []
    for i in range(n):
        p = rng.choice(products)
        status = rng.choices(STATUSES, (4, 3, 3, 1))[0]
        day = _dt.date(2026, 11, 1) + _dt.timedelta(days=rng.randint(0, 40))
        out.append({"order_id": f"LH-{10000 + i * 7 + rng.randint(0, 6):05d}",
                    "email": f"{rng.choice(first)}{rng.randint(1, 99)}@example.com", "sku": p["sku"],
                    "product": p["name"]["en"], "product_zh": p["name"]["zh"], "status": status,
                    "eta": day.isoformat()})
    return out


class OrderDB:
    """``orders.sqlite``: the orders, the tickets, and :meth:`call` for OpenAI-style tool calls."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: order database not found; build it with the desk stage "
                            "(lmstack run recipes/support-desk.yaml)")
        self.db = sqlite3.connect(self.path)
        self.db.row_factory = sqlite3.Row

    @classmethod
    def create(cls, path: str | Path, orders: list[dict[str, Any]]) -> "OrderDB":
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        db = sqlite3.connect(p)
        db.executescript("""
            CREATE TABLE orders(order_id TEXT PRIMARY KEY, email TEXT NOT NULL, sku TEXT, product TEXT,
                                product_zh TEXT, status TEXT NOT NULL, eta TEXT);
            CREATE TABLE tickets(id INTEGER PRIMARY KEY, created TEXT, reason TEXT, intent TEXT, summary TEXT,
                                 transcript TEXT);""")
        db.executemany("INSERT INTO orders VALUES (:order_id, :email, :sku, :product, :product_zh, :status, :eta)",
                       orders)
        db.commit()
        db.close()
        return cls(p)

    def order(self, order_id: str) -> dict[str, Any] | None:
        r = self.db.execute("SELECT * FROM orders WHERE order_id = ?", (order_id,)).fetchone()
        return dict(r) if r else None

    def tickets(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM tickets ORDER BY id")]

    def call(self, tool_call: dict[str, Any], transcript: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Run one OpenAI ``tool_calls`` item; returns the tool's result (``{"error": ...}`` for a refused call)."""
        import jsonschema

        fn = tool_call.get("function") or {}
        name = fn.get("name")
        if name not in _SCHEMAS:
            return {"error": f"unknown tool {str(name)[:64]!r}"}
        try:
            args = json.loads(fn.get("arguments") or "{}")
            jsonschema.validate(args, _SCHEMAS[name])
        except (ValueError, jsonschema.ValidationError) as e:
            return {"error": f"bad arguments for {name}: {str(e).splitlines()[0][:200]}"}
        if name == "create_ticket":
            cur = self.db.execute(
                "INSERT INTO tickets(created, reason, intent, summary, transcript) VALUES (?, ?, ?, ?, ?)",
                (_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), args["reason"],
                 args.get("intent"), args["summary"], json.dumps(transcript or [], ensure_ascii=False)[:100_000]))
            self.db.commit()
            return {"ticket": cur.lastrowid}
        o = self.order(args["order_id"])
        if o is None or o["email"].lower() != args["email"].lower():
            return {"error": "no order with that number and email"}
        if name == "order_status":
            return {k: o[k] for k in ("order_id", "product", "product_zh", "status", "eta")}
        if o["status"] != "processing":  # cancel_order
            return {"error": f"order {o['order_id']} is {o['status']} and can no longer be cancelled",
                    "status": o["status"]}
        self.db.execute("UPDATE orders SET status = 'cancelled' WHERE order_id = ?", (o["order_id"],))
        self.db.commit()
        return {"order_id": o["order_id"], "status": "cancelled"}

    def close(self) -> None:
        self.db.close()


def tool_call(name: str, args: dict[str, Any], i: int) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` item."""
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
