"""The support desk (second version): intents, dialogue state, order tools with a confirmation turn, escalation.

    from lmstack.apps.support.desk import Desk
    desk = Desk.load("runs/support-desk/desk")        # intent classifier + orders.sqlite + guard policy
    desk.turn("Where is my order LH-10023?")           # -> asks for the email on the order
    desk.turn("anna3@example.com")                     # -> order_status tool call -> "... is shipped ..."

Each turn: (1) the guard's input rails (:mod:`lmstack.guard`): an injection or other blocking rail escalates (the
topic rail is left to the intent classifier, which knows the desk's scope; PII is redacted in the ticket's
transcript, not in the slots the tools need); (2) an explicit request for a person escalates; (3) slots (order
number, email, product) are read from the turn and kept across turns; (4) a pending confirmation is answered
yes / no; (5) the intent classifier (:class:`lmstack.model.classify.Classifier`, the encoder) names the intent,
unless the turn only supplies a slot the active intent asked for; below ``min_confidence`` with nothing active,
it escalates; (6) the intent's action: ask for the missing slot, call a tool (an OpenAI ``tool_calls`` item run by
:class:`lmstack.apps.support.orders.OrderDB`), or ask to confirm before any change to an order.

Escalation writes a ticket (reason, intent, a summary of the state and the last turns, the redacted transcript)
to the database through the ``create_ticket`` tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.apps.support.orders import EMAIL_RE, ORDER_RE, OrderDB, tool_call

HUMAN_RE = re.compile(r"\b(human|person|agent|representative|someone real|real person|staff)\b|转人工|人工|真人|客服人员",
                      re.I)
YES_RE = re.compile(r"^\s*(y|yes|yeah|yep|sure|ok|okay|please do|go ahead)\b|是的|确认|好的|可以|对", re.I)
NO_RE = re.compile(r"^\s*(n|no|nope|don'?t|keep)\b|不|算了|保留|别", re.I)
WARRANTY_RE = re.compile(r"warrant|guarant|保修|质保", re.I)
NEEDS = {"order_status": ("order_id", "email"), "cancel_order": ("order_id", "email"), "product_question": ("product",)}
STATUS_ZH = {"processing": "处理中", "shipped": "已发货", "delivered": "已送达", "cancelled": "已取消"}

SAY = {
    "en": {"greeting": "Hello! I can check or cancel an order and answer questions about our products.",
           "order_id": "Which order is it? Please give the order number (like LH-12345).",
           "email": "What is the email address on the order?",
           "product": "Which product do you mean?",
           "status": "Order {order_id} ({product}) is {status}; expected {eta}.",
           "confirm": "Cancel order {order_id} ({product})? Please answer yes or no.",
           "cancelled": "Order {order_id} is cancelled.", "kept": "OK, order {order_id} stays as it is.",
           "confirm_again": "Please answer yes or no: cancel order {order_id}?",
           "price": "The {name} costs ${price:g}.", "warranty": "The {name} has a {years}-year warranty.",
           "not_found": "I can't find an order with that number and email.",
           "refused": "Sorry, I can't do that: {error}.",
           "escalated": "I've passed this to a colleague (ticket #{ticket}); a person will reply soon."},
    "zh": {"greeting": "您好！我可以查询或取消订单，也可以回答商品问题。",
           "order_id": "请问是哪个订单？请提供订单号（例如 LH-12345）。", "email": "请提供下单时使用的邮箱。",
           "product": "请问是哪件商品？", "status": "订单{order_id}（{product}）{status}，预计{eta}。",
           "confirm": "确认取消订单{order_id}（{product}）吗？请回答是或否。", "cancelled": "订单{order_id}已取消。",
           "kept": "好的，订单{order_id}保持不变。", "confirm_again": "请回答是或否：取消订单{order_id}吗？",
           "price": "{name}的价格是{price:g}美元。", "warranty": "{name}保修{years}年。",
           "not_found": "没有找到与该订单号和邮箱匹配的订单。", "refused": "抱歉，无法办理：{error}。",
           "escalated": "已为您转接人工客服（工单号 #{ticket}），稍后会有专人回复。"},
}


def lang_of(text: str, default: str = "en") -> str:
    """zh for Chinese characters, en for English words; ``default`` for a turn that is only an order number or an
    email (the conversation keeps its language)."""
    if re.search(r"[\u4e00-\u9fff]", text):
        return "zh"
    rest = re.sub(EMAIL_RE, " ", re.sub(ORDER_RE, " ", text, flags=re.I))
    return "en" if re.search(r"[A-Za-z]{2,}", rest) else default


def desk_guard(spec: str | Path) -> Any:
    """The policy's guard for the desk: its input rails, without its rate limit (a per-client limit belongs to the
    server in front of the desk; here it would count every customer's turns as one client's)."""
    from lmstack.guard import Guard
    from lmstack.guard.policy import load_policy, policy_path

    return Guard(load_policy(policy_path(spec)).model_copy(update={"rate_limit": None}))


class ApiToolCaller:
    """The order tools' arguments written by a model behind an OpenAI-compatible endpoint (``lmstack serve``):
    the desk decides *which* tool (``tool_choice`` names it), the model writes the arguments from the conversation,
    constrained by the server to the tool's JSON schema (docs/structured.md). ``propose`` returns the OpenAI
    ``tool_calls`` item, or None when the endpoint returns none or fails (then the desk's own call runs)."""

    def __init__(self, base_url: str, model: str, api_key: str = "none", max_tokens: int = 160, timeout: float = 300):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.model, self.max_tokens = model, max_tokens

    def propose(self, name: str, user_turns: list[str]) -> dict[str, Any] | None:
        from lmstack.apps.support.orders import TOOLS

        msgs = [{"role": "system", "content": "You are the Larkspur Home support desk. Call the tool with the order "
                                              "number and the email the customer gave."}]
        msgs += [{"role": "user", "content": t} for t in user_turns[-6:]]
        import openai

        try:
            r = self.client.chat.completions.create(model=self.model, messages=msgs, tools=TOOLS, temperature=0,
                                                    tool_choice={"type": "function", "function": {"name": name}},
                                                    max_tokens=self.max_tokens)
        except openai.APIError as e:  # the endpoint refused or failed: the desk's own call runs (logged)
            import logging

            logging.getLogger(__name__).warning("tool model at %s: %s", self.client.base_url, str(e)[:200])
            return None
        calls = r.choices[0].message.tool_calls or []
        if not calls:
            return None
        c = calls[0]
        return {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}


@dataclass
class DeskState:
    intent: str | None = None
    slots: dict[str, str] = field(default_factory=dict)
    pending: str | None = None  # "cancel_order" while waiting for the customer's yes / no
    escalated: str | None = None  # the reason, once escalated
    ticket: int | None = None
    lang: str = "en"
    transcript: list[dict[str, Any]] = field(default_factory=list)  # redacted where the guard redacts
    intents: list[tuple[str, float]] = field(default_factory=list)  # (intent, confidence) per classified turn
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    user_turns: list[str] = field(default_factory=list)  # as typed (the model that writes tool arguments reads them)
    model_args: list[bool] = field(default_factory=list)  # per model-written call: its arguments == the desk's slots


class Desk:
    def __init__(self, intents: Any, db: OrderDB, products: list[dict[str, Any]], guard: Any = None,
                 min_confidence: float = 0.5, tool_caller: ApiToolCaller | None = None):
        self.clf, self.db, self.products, self.guard = intents, db, products, guard
        self.tool_caller = tool_caller  # None: the desk writes the order tools' arguments from its slots
        self.min_confidence = min_confidence
        self.state = DeskState()

    @classmethod
    def load(cls, desk_dir: str | Path, guard: str | None = "default", min_confidence: float | None = None) -> "Desk":
        """A desk directory as the desk stage writes it: ``intents/`` (classifier), ``orders.sqlite``,
        ``settings.json`` (min_confidence)."""
        from lmstack.apps.support.kb import load_kb
        from lmstack.model.classify import Classifier
        from lmstack.utils.io import read_json

        d = Path(desk_dir)
        settings = read_json(d / "settings.json") if (d / "settings.json").is_file() else {}
        g = desk_guard(guard) if guard else None
        return cls(Classifier(d / "intents"), OrderDB(d / "orders.sqlite"), load_kb().products, g,
                   min_confidence if min_confidence is not None else float(settings.get("min_confidence", 0.5)))

    def reset(self) -> None:
        self.state = DeskState()

    # ---------------------------------------------------------------------------------------- reading a turn
    def slots_in(self, text: str) -> dict[str, str]:
        found: dict[str, str] = {}
        if m := re.search(ORDER_RE, text, re.I):
            found["order_id"] = m.group(0).upper()
        if m := re.search(EMAIL_RE, text):
            found["email"] = m.group(0)
        low = text.lower()
        best = None
        for p in self.products:
            for name in (p["name"]["en"].lower(), p["name"]["zh"]):
                if name in low and (best is None or len(name) > best[0]):
                    best = (len(name), p["sku"])
        if best:
            found["product"] = best[1]
        return found

    def _guard_fires(self, text: str) -> tuple[bool, str]:
        """(escalate?, the text to keep in the transcript: redacted by the guard's PII rail)."""
        if self.guard is None:
            return False, text
        v = self.guard.check_input(text)
        blocking = [r.rail for r in v.results if r.action == "block" and r.rail != "input.topic"]
        kept = v.text if v.action == "redact" else text
        return bool(blocking), (text if blocking else kept)

    # ---------------------------------------------------------------------------------------- one turn
    def turn(self, text: str) -> dict[str, Any]:
        s = self.state
        text = text[:2000]
        s.lang = lang_of(text, s.lang)
        fired, kept = self._guard_fires(text)
        s.transcript.append({"role": "user", "content": kept})
        s.user_turns.append(text)
        if s.escalated:
            return self._say(SAY[s.lang]["escalated"].format(ticket=s.ticket))
        if fired:
            return self._escalate("guard")
        new = self.slots_in(text)
        if s.pending:
            return self._confirm(text)
        if HUMAN_RE.search(text):
            s.intents.append(("human", 1.0))
            return self._escalate("requested")
        missing = [k for k in NEEDS.get(s.intent or "", ()) if k not in s.slots]
        s.slots.update(new)
        # a turn that gives a slot the active intent is waiting for keeps the intent; anything else is classified
        # (an order number given while a product was asked for is a new request, not an answer)
        waiting = bool(missing)
        if not set(new) & set(missing):
            pred = self.clf.predict([text])[0]
            s.intents.append((pred["label"], pred["score"]))
            if pred["score"] < self.min_confidence and not waiting:
                return self._escalate("low_confidence")
            if pred["score"] >= self.min_confidence:
                s.intent = pred["label"]
        return self._act()

    def _act(self) -> dict[str, Any]:
        s, say = self.state, SAY[self.state.lang]
        if s.intent == "greeting":
            return self._say(say["greeting"])
        if s.intent in ("human",):
            return self._escalate("requested")
        if s.intent not in NEEDS:
            return self._escalate("out_of_scope")
        missing = [k for k in NEEDS[s.intent] if k not in s.slots]
        if missing:
            return self._say(say[missing[0]])
        if s.intent == "product_question":
            p = next(p for p in self.products if p["sku"] == s.slots["product"])
            last = s.transcript[-1]["content"]
            key = "warranty" if WARRANTY_RE.search(last) else "price"
            return self._say(say[key].format(name=p["name"][s.lang], price=p["price"], years=p["warranty_years"]))
        args = {"order_id": s.slots["order_id"], "email": s.slots["email"]}
        if s.intent == "order_status":
            r = self._call("order_status", args)
            if "error" in r:
                return self._say(say["not_found"])
            return self._say(say["status"].format(
                order_id=r["order_id"], product=r["product_zh"] if s.lang == "zh" else r["product"],
                status=STATUS_ZH[r["status"]] if s.lang == "zh" else r["status"], eta=r["eta"]))
        # cancel_order: look it up (who may see it), then ask before changing anything
        r = self._call("order_status", args)
        if "error" in r:
            return self._say(say["not_found"])
        s.pending = "cancel_order"
        return self._say(say["confirm"].format(order_id=r["order_id"],
                                               product=r["product_zh"] if s.lang == "zh" else r["product"]))

    def _confirm(self, text: str) -> dict[str, Any]:
        s, say = self.state, SAY[self.state.lang]
        oid = s.slots.get("order_id")
        if NO_RE.search(text):
            s.pending = None
            return self._say(say["kept"].format(order_id=oid))
        if YES_RE.search(text):
            s.pending = None
            r = self._call("cancel_order", {"order_id": oid, "email": s.slots["email"]})
            if "error" in r:
                return self._say(say["refused"].format(error=r["error"]))
            return self._say(say["cancelled"].format(order_id=oid))
        return self._say(say["confirm_again"].format(order_id=oid))

    # ---------------------------------------------------------------------------------------- tools
    def _call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        call = tool_call(name, args, len(self.state.tool_calls))
        if self.tool_caller is not None and name != "create_ticket":
            proposed = self.tool_caller.propose(name, self.state.user_turns)
            if proposed is not None:  # the model's call runs as written; whether it matched the slots is recorded
                import json

                try:
                    same = json.loads(proposed["function"]["arguments"]) == args
                except ValueError:
                    same = False
                self.state.model_args.append(same)
                call = proposed
        result = self.db.call(call, self.state.transcript)
        self.state.tool_calls.append({**call, "result": result})
        self.state.transcript.append({"role": "assistant", "tool_calls": [call]})
        self.state.transcript.append({"role": "tool", "tool_call_id": call["id"], "content": str(result)})
        return result

    def summary(self) -> str:
        """The ticket's summary of the conversation: intent, slots, the last customer turns."""
        s = self.state
        users = [m["content"] for m in s.transcript if m["role"] == "user"][-3:]
        slots = ", ".join(f"{k}={v}" for k, v in sorted(s.slots.items())) or "none"
        return (f"reason: {s.escalated}; intent: {s.intent or '-'}; slots: {slots}; language: {s.lang}; "
                f"last customer turns: " + " | ".join(u[:200] for u in users))[:2000]

    def _escalate(self, reason: str) -> dict[str, Any]:
        s = self.state
        s.escalated, s.pending = reason, None
        r = self._call("create_ticket", {"reason": reason, "intent": s.intent or "-", "summary": self.summary()})
        s.ticket = r.get("ticket")
        return self._say(SAY[s.lang]["escalated"].format(ticket=s.ticket))

    def _say(self, text: str) -> dict[str, Any]:
        s = self.state
        s.transcript.append({"role": "assistant", "content": text})
        return {"text": text, "intent": s.intent, "slots": dict(s.slots), "pending": s.pending,
                "escalated": s.escalated, "ticket": s.ticket}
