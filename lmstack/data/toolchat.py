"""Synthetic tool-use conversations (English and Chinese) for teaching a chat model to call functions.

A small instruct model (SmolLM2-135M-Instruct) answers in prose when it is given tools: it was not trained to
write ``<tool_call>`` blocks. :func:`tool_chats` writes OpenAI-format chat records (``messages`` with assistant
``tool_calls``, ``tools``) that ``lmstack finetune`` renders exactly as ``lmstack serve`` renders a request
(``lmstack.tokenizer.tools``), covering what a caller of ``tool_choice: "auto"`` expects:

* ``single``   one relevant call among 1-4 offered tools (arguments copied from the request, nested objects and
               arrays included);
* ``parallel`` one call per entity ("the weather in Paris and in Oslo") when the request names several;
* ``none``     a message the tools cannot help with (greetings, arithmetic, thanks): a prose answer, no call;
* ``result``   a tool's result is in the conversation: the answer reports it in prose;
* ``code``     "write a class ... and save it": one call whose ``code`` argument is a complete Python class
               (docstrings, a ``threading.Lock`` when asked to be thread-safe) built from the request.

Tools are split: ``TRAIN_TOOLS`` make the training records, ``HELDOUT_TOOLS`` (other names, other schemas) make the
held-out records, so the ``tool_calls`` eval task measures calling tools the model has never seen. Everything is
generated from templates and value lists written for the project (no external data); the same seed gives the
same records.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("single", "parallel", "none", "result", "code")
DEFAULT_MIX = {"single": 0.40, "parallel": 0.15, "none": 0.20, "result": 0.13, "code": 0.12}

CITIES = [("Paris", "巴黎"), ("Tokyo", "东京"), ("Oslo", "奥斯陆"), ("Cairo", "开罗"), ("Lima", "利马"),
          ("Berlin", "柏林"), ("Madrid", "马德里"), ("Toronto", "多伦多"), ("Sydney", "悉尼"), ("Nairobi", "内罗毕"),
          ("Shanghai", "上海"), ("Chengdu", "成都"), ("Seoul", "首尔"), ("Vienna", "维也纳"), ("Denver, CO", "丹佛"),
          ("Austin, TX", "奥斯汀"), ("Hangzhou", "杭州"), ("Dublin", "都柏林")]
PEOPLE = ["Maria Lopez", "Chen Wei", "Aisha Khan", "Tom Becker", "Li Na", "Omar Haddad", "Yuki Sato", "Priya Nair",
          "Zhang Min", "Lukas Novak", "Ana Costa", "Wang Fang"]
CURRENCIES = ["USD", "EUR", "CNY", "JPY", "GBP", "CHF"]
PRODUCTS = [("wireless mouse", "无线鼠标"), ("desk lamp", "台灯"), ("yoga mat", "瑜伽垫"), ("water bottle", "水杯"),
            ("backpack", "双肩包"), ("phone case", "手机壳"), ("notebook", "笔记本"), ("tea set", "茶具")]
LANGS = [("French", "法语"), ("German", "德语"), ("Japanese", "日语"), ("Spanish", "西班牙语"), ("Chinese", "中文")]
DIETS = ["vegetarian", "vegan", "gluten_free", "nut_allergy", "none"]


def _fn(name: str, desc: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {
        "type": "object", "properties": props, "required": required}}}


def _s(desc: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": desc} if desc else {}), **kw}


@dataclass
class Tool:
    """A function definition and how to ask for it: ``make(rng, zh)`` -> (request, arguments, result, answer)."""

    spec: dict[str, Any]
    make: Callable[[random.Random, bool], tuple[str, dict[str, Any], dict[str, Any], str]]
    # several entities in one request -> one call each: (rng, zh) -> (request, [arguments...])
    many: Callable[[random.Random, bool], tuple[str, list[dict[str, Any]]]] | None = None

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]


def _city(rng: random.Random, zh: bool) -> tuple[str, str]:
    en, z = rng.choice(CITIES)
    return (z if zh else en), en


def _date(rng: random.Random) -> str:
    return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


# ------------------------------------------------------------------------------------------------ training tools
def _weather(rng, zh):
    shown, _ = _city(rng, zh)
    q = rng.choice(["{c}现在天气怎么样？", "帮我查一下{c}的天气。", "{c}今天冷吗？"] if zh else
                   ["What's the weather like in {c} right now?", "Is it raining in {c}?",
                    "Check the current weather in {c}, please.", "How warm is it in {c} today?"]).format(c=shown)
    t = rng.randint(-5, 33)
    sky = rng.choice(["sunny", "cloudy", "light rain"])
    zsky = {"sunny": "晴", "cloudy": "多云", "light rain": "小雨"}[sky]
    ans = f"{shown}现在{zsky}，气温{t}°C。" if zh else f"It is {t}°C and {sky} in {shown} right now."
    return q, {"city": shown}, {"temperature_c": t, "conditions": sky}, ans


def _weather_many(rng, zh):
    a, b = rng.sample(CITIES, 2)
    x, y = (a[1], b[1]) if zh else (a[0], b[0])
    q = (rng.choice(["{a}和{b}的天气分别怎么样？", "帮我查{a}和{b}现在的天气。"]) if zh else
         rng.choice(["What's the weather in {a} and in {b}?", "Compare the current weather in {a} and {b}.",
                     "I'm flying from {a} to {b}; what's the weather in both?"])).format(a=x, b=y)
    return q, [{"city": x}, {"city": y}]


def _convert(rng, zh):
    amt = rng.choice([12, 50, 99.5, 250, 1200, 8.75])
    f, t = rng.sample(CURRENCIES, 2)
    q = (rng.choice(["把{a} {f}换算成{t}。", "{a} {f}等于多少{t}？"]) if zh else
         rng.choice(["Convert {a} {f} to {t}.", "How much is {a} {f} in {t}?", "What do I get for {a} {f} in {t}?"])
         ).format(a=amt, f=f, t=t)
    rate = round(rng.uniform(0.1, 9.0), 3)
    out = round(amt * rate, 2)
    ans = f"{amt} {f} 约等于 {out} {t}。" if zh else f"{amt} {f} is about {out} {t}."
    return q, {"amount": amt, "from_currency": f, "to_currency": t}, {"result": out, "rate": rate}, ans


def _convert_many(rng, zh):
    f, t1, t2 = rng.sample(CURRENCIES, 3)
    amt = rng.choice([20, 100, 300])
    q = (f"把{amt} {f}分别换算成{t1}和{t2}。" if zh else f"Convert {amt} {f} into both {t1} and {t2}.")
    return q, [{"amount": amt, "from_currency": f, "to_currency": t1},
               {"amount": amt, "from_currency": f, "to_currency": t2}]


def _email(rng, zh):
    who = rng.choice(PEOPLE)
    addr = who.lower().replace(" ", ".") + "@example.com"
    topic = rng.choice([("the meeting moved to Friday", "会议改到周五"), ("the invoice is attached", "发票已附上"),
                        ("the report is ready", "报告已经准备好")])
    subj = topic[1] if zh else topic[0].capitalize()
    q = (f"给{who}（{addr}）发封邮件，告诉他{topic[1]}。" if zh else
         rng.choice(["Email {w} at {a} and tell them {t}.", "Send a message to {a} saying {t}."]).format(
             w=who, a=addr, t=topic[0]))
    body = topic[1] + "。" if zh else topic[0].capitalize() + "."
    ans = f"邮件已发送给{who}。" if zh else f"Done: the email to {who} has been sent."
    return q, {"to": addr, "subject": subj, "body": body}, {"status": "sent"}, ans


def _order_status(rng, zh):
    oid = f"A{rng.randint(10000, 99999)}"
    q = (rng.choice(["我的订单{o}到哪了？", "查一下订单{o}的状态。"]) if zh else
         rng.choice(["Where is my order {o}?", "What's the status of order {o}?", "Has order {o} shipped yet?"])
         ).format(o=oid)
    st = rng.choice(["shipped", "processing", "delivered"])
    zst = {"shipped": "已发货", "processing": "正在处理", "delivered": "已送达"}[st]
    ans = f"订单{oid}的状态是：{zst}。" if zh else f"Order {oid} is {st}."
    return q, {"order_id": oid}, {"order_id": oid, "status": st}, ans


def _order_many(rng, zh):
    a, b = (f"A{rng.randint(10000, 99999)}" for _ in range(2))
    q = f"帮我查订单{a}和{b}。" if zh else f"Check the status of orders {a} and {b}."
    return q, [{"order_id": a}, {"order_id": b}]


def _create_order(rng, zh):
    k = rng.randint(1, 3)
    items = rng.sample(PRODUCTS, k)
    qty = [rng.randint(1, 4) for _ in items]
    name = rng.choice(PEOPLE)
    city = rng.choice(CITIES)
    street = f"{rng.randint(1, 300)} {rng.choice(['Oak', 'Pine', 'Lake', 'Hill'])} Street"
    if zh:
        parts = "、".join(f"{n}个{p[1]}" for p, n in zip(items, qty))
        q = f"帮{name}下单：{parts}，寄到{city[1]}{street}。"
        lines = [{"product": p[1], "quantity": n} for p, n in zip(items, qty)]
        addr = {"street": street, "city": city[1]}
    else:
        parts = ", ".join(f"{n} x {p[0]}" for p, n in zip(items, qty))
        q = f"Place an order for {name}: {parts}, shipped to {street}, {city[0]}."
        lines = [{"product": p[0], "quantity": n} for p, n in zip(items, qty)]
        addr = {"street": street, "city": city[0]}
    oid = f"B{rng.randint(1000, 9999)}"
    ans = f"订单已创建，编号{oid}。" if zh else f"Your order is placed; the order number is {oid}."
    return q, {"customer": name, "items": lines, "shipping_address": addr}, {"order_id": oid}, ans


def _calendar(rng, zh):
    d = _date(rng)
    h = f"{rng.randint(8, 18):02d}:{rng.choice(['00', '30'])}"
    title = rng.choice([("dentist appointment", "看牙医"), ("team sync", "团队例会"), ("call with the bank", "给银行打电话")])
    people = rng.sample(PEOPLE, rng.randint(0, 2))
    if zh:
        q = f"在{d} {h}安排一个{title[1]}" + (f"，邀请{'和'.join(people)}" if people else "") + "。"
        args = {"title": title[1], "date": d, "start_time": h}
    else:
        q = f"Put a {title[0]} on my calendar on {d} at {h}" + (f" with {' and '.join(people)}" if people else "") + "."
        args = {"title": title[0], "date": d, "start_time": h}
    if people:
        args["attendees"] = people
    ans = f"已在{d} {h}添加日程。" if zh else f"Added to your calendar on {d} at {h}."
    return q, args, {"event_id": rng.randint(100, 999)}, ans


def _search_products(rng, zh):
    p = rng.choice(PRODUCTS)
    cap = rng.choice([20, 50, 100])
    q = (f"有没有{cap}美元以内的{p[1]}？" if zh else
         rng.choice([f"Find me a {p[0]} under ${cap}.", f"Search the shop for a {p[0]} that costs less than ${cap}."]))
    found = rng.randint(0, 5)
    ans = (f"找到{found}款符合条件的{p[1]}。" if zh else f"I found {found} {p[0]} options under ${cap}.")
    return q, {"query": p[1] if zh else p[0], "max_price": cap}, {"count": found}, ans


def _translate(rng, zh):
    lang = rng.choice(LANGS)
    text = rng.choice(["Good morning", "Where is the train station?", "Thank you very much"])
    q = (f"把“{text}”翻译成{lang[1]}。" if zh else f"Translate \"{text}\" into {lang[0]}.")
    ans = "翻译好了。" if zh else "Here is the translation."
    return q, {"text": text, "target_language": lang[0]}, {"translation": "..."}, ans


def _alarm(rng, zh):
    h = f"{rng.randint(5, 9):02d}:{rng.choice(['00', '15', '30', '45'])}"
    q = (f"明天早上{h}叫我起床。" if zh else rng.choice([f"Wake me up at {h} tomorrow.", f"Set an alarm for {h}."]))
    ans = f"闹钟已设为{h}。" if zh else f"Your alarm is set for {h}."
    return q, {"time": h}, {"ok": True}, ans


def _stock(rng, zh):
    sym = rng.choice(["AAPL", "MSFT", "NVDA", "TSLA", "BABA", "SONY"])
    q = (f"{sym}现在股价多少？" if zh else rng.choice([f"What's {sym} trading at?", f"Get me the stock price of {sym}."]))
    px = round(rng.uniform(20, 900), 2)
    ans = f"{sym}当前价格为{px}美元。" if zh else f"{sym} is trading at ${px}."
    return q, {"symbol": sym}, {"price": px}, ans


def _stock_many(rng, zh):
    a, b = rng.sample(["AAPL", "MSFT", "NVDA", "TSLA", "BABA", "SONY"], 2)
    q = f"{a}和{b}的股价各是多少？" if zh else f"Give me the prices of {a} and {b}."
    return q, [{"symbol": a}, {"symbol": b}]


TRAIN_TOOLS = [
    Tool(_fn("get_current_weather", "Get the current weather in a city",
             {"city": _s("City name, e.g. Paris")}, ["city"]), _weather, _weather_many),
    Tool(_fn("convert_currency", "Convert an amount between currencies",
             {"amount": {"type": "number"}, "from_currency": _s("ISO code"), "to_currency": _s("ISO code")},
             ["amount", "from_currency", "to_currency"]), _convert, _convert_many),
    Tool(_fn("send_email", "Send an email", {"to": _s("Recipient address"), "subject": _s(), "body": _s()},
             ["to", "subject", "body"]), _email),
    Tool(_fn("get_order_status", "Look up the status of a shop order", {"order_id": _s("Order number")},
             ["order_id"]), _order_status, _order_many),
    Tool(_fn("create_order", "Create a shop order for a customer", {
        "customer": _s("Customer name"),
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "product": _s(), "quantity": {"type": "integer", "minimum": 1}}, "required": ["product", "quantity"]}},
        "shipping_address": {"type": "object", "properties": {"street": _s(), "city": _s()},
                             "required": ["street", "city"]}}, ["customer", "items", "shipping_address"]), _create_order),
    Tool(_fn("create_calendar_event", "Add an event to the user's calendar", {
        "title": _s(), "date": _s("YYYY-MM-DD"), "start_time": _s("HH:MM, 24-hour"),
        "attendees": {"type": "array", "items": _s()}}, ["title", "date", "start_time"]), _calendar),
    Tool(_fn("search_products", "Search the shop's catalog", {"query": _s(), "max_price": {"type": "number"}},
             ["query"]), _search_products),
    Tool(_fn("translate_text", "Translate text into another language",
             {"text": _s(), "target_language": _s("Language name, e.g. French")}, ["text", "target_language"]),
         _translate),
    Tool(_fn("set_alarm", "Set an alarm", {"time": _s("HH:MM, 24-hour")}, ["time"]), _alarm),
    Tool(_fn("get_stock_price", "Get the latest price of a stock", {"symbol": _s("Ticker symbol")}, ["symbol"]),
         _stock, _stock_many),
]


# ------------------------------------------------------------------------------------------------ held-out tools
def _flight(rng, zh):
    a, b = rng.sample(CITIES, 2)
    d = _date(rng)
    x, y = (a[1], b[1]) if zh else (a[0], b[0])
    q = f"帮我订一张{d}从{x}到{y}的机票。" if zh else f"Book me a flight from {x} to {y} on {d}."
    return q, {"origin": x, "destination": y, "date": d}, {"booking": "K7Q2"}, (
        "机票已预订。" if zh else "Your flight is booked.")


def _timezone(rng, zh):
    shown, _ = _city(rng, zh)
    q = f"{shown}现在几点？" if zh else rng.choice([f"What time is it in {shown}?", f"Tell me the local time in {shown}."])
    return q, {"location": shown}, {"time": "14:05"}, (f"{shown}现在是14:05。" if zh else f"It is 14:05 in {shown}.")


def _timezone_many(rng, zh):
    a, b = rng.sample(CITIES, 2)
    x, y = (a[1], b[1]) if zh else (a[0], b[0])
    q = f"{x}和{y}现在各是几点？" if zh else f"What time is it in {x} and in {y}?"
    return q, [{"location": x}, {"location": y}]


def _reminder(rng, zh):
    d = _date(rng)
    task = rng.choice([("pay the rent", "交房租"), ("call mom", "给妈妈打电话"), ("renew the passport", "续签护照")])
    q = f"提醒我在{d}{task[1]}。" if zh else f"Remind me to {task[0]} on {d}."
    return q, {"text": task[1] if zh else task[0], "date": d}, {"ok": True}, ("好的，已设置提醒。" if zh else "Reminder set.")


def _restaurant(rng, zh):
    shown, _ = _city(rng, zh)
    n = rng.randint(2, 8)
    d = _date(rng)
    q = (f"在{shown}订一家餐厅，{d}，{n}个人。" if zh else f"Reserve a table for {n} in {shown} on {d}.")
    return q, {"city": shown, "party_size": n, "date": d}, {"confirmation": "R55"}, (
        "已为您预订。" if zh else "Your table is reserved.")


def _refund(rng, zh):
    oid = f"A{rng.randint(10000, 99999)}"
    reason = rng.choice([("it arrived broken", "收到时已损坏"), ("wrong size", "尺码不对")])
    q = f"订单{oid}我要退款，{reason[1]}。" if zh else f"I want a refund for order {oid}, {reason[0]}."
    return q, {"order_id": oid, "reason": reason[1] if zh else reason[0]}, {"status": "refund started"}, (
        "退款已受理。" if zh else "Your refund has been started.")


HELDOUT_TOOLS = [
    Tool(_fn("book_flight", "Book a one-way flight", {"origin": _s(), "destination": _s(), "date": _s("YYYY-MM-DD")},
             ["origin", "destination", "date"]), _flight),
    Tool(_fn("get_local_time", "Get the local time at a location", {"location": _s("A city")}, ["location"]),
         _timezone, _timezone_many),
    Tool(_fn("create_reminder", "Create a reminder", {"text": _s(), "date": _s("YYYY-MM-DD")}, ["text", "date"]),
         _reminder),
    Tool(_fn("reserve_table", "Reserve a restaurant table",
             {"city": _s(), "party_size": {"type": "integer"}, "date": _s("YYYY-MM-DD")},
             ["city", "party_size", "date"]), _restaurant),
    Tool(_fn("request_refund", "Start a refund for an order", {"order_id": _s(), "reason": _s()},
             ["order_id", "reason"]), _refund),
]


# ------------------------------------------------------------------------------------------------ no-tool turns
def _chitchat(rng: random.Random, zh: bool) -> tuple[str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    en = [("Hi there!", "Hello! How can I help you today?"),
          ("Thanks, that's all.", "You're welcome! Have a great day."),
          (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
          (f"What is {a} times {b}?", f"{a} times {b} is {a * b}."),
          ("Tell me a short joke.", "Why did the computer go to the doctor? It had a virus."),
          ("What can you do?", "I can answer questions and use the tools I have been given when they help."),
          ("How many days are in a week?", "A week has 7 days."),
          ("Say good night in Spanish.", "\"Good night\" in Spanish is \"buenas noches\".")]
    zhs = [("你好！", "你好！有什么可以帮你的吗？"), ("谢谢，没事了。", "不客气，祝你愉快！"),
           (f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"), (f"{a}乘以{b}是多少？", f"{a}乘以{b}等于{a * b}。"),
           ("你能做什么？", "我可以回答问题，并在需要时调用提供给我的工具。"), ("一年有几个月？", "一年有12个月。")]
    return rng.choice(zhs if zh else en)


# ------------------------------------------------------------------------------------------------ code
_CLASSES = [  # (name, purpose, methods: (signature, docstring, body lines))
    ("LRUCache", "a least-recently-used cache with a fixed capacity", [
        ("get(self, key)", "Return the value for key, or None, and mark it as recently used.",
         ["if key not in self._items:", "    return None", "self._items.move_to_end(key)", "return self._items[key]"]),
        ("put(self, key, value)", "Store value under key, evicting the least recently used item when full.",
         ["self._items[key] = value", "self._items.move_to_end(key)", "if len(self._items) > self.capacity:",
          "    self._items.popitem(last=False)"])],
     ["capacity"], "from collections import OrderedDict", "self._items = OrderedDict()"),
    ("BankAccount", "a bank account with deposits and withdrawals", [
        ("deposit(self, amount)", "Add amount to the balance and return the new balance.",
         ["if amount <= 0:", "    raise ValueError(\"amount must be positive\")", "self.balance += amount",
          "return self.balance"]),
        ("withdraw(self, amount)", "Take amount from the balance; return False when funds are insufficient.",
         ["if amount > self.balance:", "    return False", "self.balance -= amount", "return True"])],
     ["balance"], "", ""),
    ("RateCounter", "a counter of events in a sliding time window", [
        ("record(self)", "Record one event now.", ["self._events.append(time.monotonic())", "self._trim()"]),
        ("count(self)", "Return how many events happened in the window.", ["self._trim()", "return len(self._events)"]),
        ("_trim(self)", "Drop events older than the window.",
         ["cutoff = time.monotonic() - self.window", "while self._events and self._events[0] < cutoff:",
          "    self._events.popleft()"])],
     ["window"], "import time\nfrom collections import deque", "self._events = deque()"),
    ("Inventory", "a stock inventory of products", [
        ("add(self, product, quantity=1)", "Add quantity units of product.",
         ["self._stock[product] = self._stock.get(product, 0) + quantity"]),
        ("remove(self, product, quantity=1)", "Remove units; return False if there are not enough.",
         ["if self._stock.get(product, 0) < quantity:", "    return False", "self._stock[product] -= quantity",
          "return True"])],
     [], "", "self._stock = {}"),
    ("TaskQueue", "a first-in first-out queue of tasks", [
        ("push(self, task)", "Append a task to the queue.", ["self._tasks.append(task)"]),
        ("pop(self)", "Remove and return the oldest task, or None when empty.",
         ["if not self._tasks:", "    return None", "return self._tasks.popleft()"]),
        ("size(self)", "Return the number of queued tasks.", ["return len(self._tasks)"])],
     [], "from collections import deque", "self._tasks = deque()"),
    ("Stopwatch", "a stopwatch that measures elapsed time", [
        ("start(self)", "Start timing.", ["self._start = time.perf_counter()"]),
        ("stop(self)", "Stop timing and return the elapsed seconds.",
         ["if self._start is None:", "    raise RuntimeError(\"not started\")",
          "self.elapsed = time.perf_counter() - self._start", "self._start = None", "return self.elapsed"])],
     [], "import time", "self._start = None\nself.elapsed = 0.0"),
    ("ResourcePool", "a pool of interchangeable resources that callers borrow and return", [
        ("acquire(self, count=1)", "Take count resources if that many are free; return True on success, else False.",
         ["if self._free < count:", "    return False", "self._free -= count", "return True"]),
        ("release(self, count=1)", "Return count resources to the pool.",
         ["self._free = min(self.size, self._free + count)"]),
        ("wait_for_resource(self, count=1)", "Block until count resources can be taken, then take them.",
         ["while not self.acquire(count):", "    time.sleep(0.01)"])],
     ["size"], "import time", "self._free = size"),
    ("BoundedBuffer", "a buffer that holds at most a fixed number of items", [
        ("put(self, item)", "Add item; return False when the buffer is full.",
         ["if len(self._items) >= self.capacity:", "    return False", "self._items.append(item)", "return True"]),
        ("get(self)", "Remove and return the oldest item, or None when empty.",
         ["if not self._items:", "    return None", "return self._items.popleft()"]),
        ("wait_for_item(self, timeout=5.0)", "Block until an item arrives or timeout seconds pass; return it or None.",
         ["deadline = time.monotonic() + timeout", "while time.monotonic() < deadline:", "    item = self.get()",
          "    if item is not None:", "        return item", "    time.sleep(0.01)", "return None"])],
     ["capacity"], "import time\nfrom collections import deque", "self._items = deque()"),
    ("ExpiringStore", "a key-value store whose entries expire after a time-to-live", [
        ("set(self, key, value)", "Store value under key with a fresh expiry time.",
         ["self._data[key] = (value, time.monotonic() + self.ttl)"]),
        ("get(self, key)", "Return the value for key, or None when missing or expired.",
         ["entry = self._data.get(key)", "if entry is None or entry[1] < time.monotonic():",
          "    self._data.pop(key, None)", "    return None", "return entry[0]"]),
        ("delete(self, key)", "Remove key; return True if it was present.",
         ["return self._data.pop(key, None) is not None"])],
     ["ttl"], "import time", "self._data = {}"),
    ("ShoppingCart", "a shopping cart that totals item prices", [
        ("add_item(self, name, price, quantity=1)", "Add quantity units of an item at price each.",
         ["old = self._lines.get(name, (price, 0))", "self._lines[name] = (price, old[1] + quantity)"]),
        ("remove_item(self, name)", "Remove an item; return False if it is not in the cart.",
         ["return self._lines.pop(name, None) is not None"]),
        ("total(self)", "Return the total price of the cart.",
         ["return sum(price * qty for price, qty in self._lines.values())"])],
     [], "", "self._lines = {}"),
    ("RetryPolicy", "a helper that retries a failing function with a delay between attempts", [
        ("run(self, func)", "Call func until it succeeds or attempts run out; re-raise the last error.",
         ["for attempt in range(self.max_attempts):", "    try:", "        return func()",
          "    except Exception:", "        if attempt == self.max_attempts - 1:", "            raise",
          "        time.sleep(self.delay)"]),
        ("describe(self)", "Return a short description of the policy.",
         ["return f\"{self.max_attempts} attempts, {self.delay}s apart\""])],
     ["max_attempts", "delay"], "import time", ""),
    ("CircuitBreaker", "a circuit breaker that stops calls after repeated failures", [
        ("record_failure(self)", "Count a failure and open the circuit at the threshold.",
         ["self._failures += 1", "if self._failures >= self.threshold:", "    self._opened = time.monotonic()"]),
        ("record_success(self)", "Reset the failure count and close the circuit.",
         ["self._failures = 0", "self._opened = None"]),
        ("allow(self)", "Return True if a call may go through now.",
         ["if self._opened is None:", "    return True", "return time.monotonic() - self._opened > self.cooldown"])],
     ["threshold", "cooldown"], "import time", "self._failures = 0\nself._opened = None"),
    ("Scoreboard", "a scoreboard of players and their points", [
        ("add_points(self, player, points)", "Add points to a player's score and return the new score.",
         ["self._scores[player] = self._scores.get(player, 0) + points", "return self._scores[player]"]),
        ("leader(self)", "Return the player with the most points, or None.",
         ["if not self._scores:", "    return None", "return max(self._scores, key=self._scores.get)"]),
        ("reset(self)", "Clear every score.", ["self._scores.clear()"])],
     [], "", "self._scores = {}"),
    ("WordCounter", "a counter of word frequencies in text", [
        ("add_text(self, text)", "Count every word of text.",
         ["for word in text.lower().split():", "    self._counts[word] += 1"]),
        ("count(self, word)", "Return how often word was seen.", ["return self._counts[word.lower()]"]),
        ("most_common(self, n=3)", "Return the n most frequent words with their counts.",
         ["return self._counts.most_common(n)"])],
     [], "from collections import Counter", "self._counts = Counter()"),
    ("EventLog", "a log that keeps the most recent messages", [
        ("append(self, message)", "Add a message with its timestamp.",
         ["self._entries.append((time.time(), message))"]),
        ("recent(self, n=10)", "Return the last n messages, newest last.",
         ["return [m for _, m in list(self._entries)[-n:]]"]),
        ("clear(self)", "Remove every message.", ["self._entries.clear()"])],
     ["max_entries"], "import time\nfrom collections import deque", "self._entries = deque(maxlen=max_entries)"),
    ("PriorityQueue", "a queue that returns the item with the lowest priority number first", [
        ("push(self, item, priority)", "Add item with the given priority.",
         ["heapq.heappush(self._heap, (priority, self._seq, item))", "self._seq += 1"]),
        ("pop(self)", "Remove and return the most urgent item, or None when empty.",
         ["if not self._heap:", "    return None", "return heapq.heappop(self._heap)[2]"]),
        ("peek(self)", "Return the most urgent item without removing it, or None.",
         ["return self._heap[0][2] if self._heap else None"])],
     [], "import heapq", "self._heap = []\nself._seq = 0"),
]


_DEMO_ARGS = {"key": "'a'", "value": "1", "amount": "5", "product": "'pen'", "task": "'job'", "item": "'job'",
              "name": "'pen'", "price": "2.5", "player": "'ann'", "points": "3", "text": "'a b a'",
              "message": "'started'", "func": "print", "word": "'a'"}


def _code(rng: random.Random, zh: bool) -> tuple[str, dict[str, Any]]:
    name, purpose, methods, params, imports, init = rng.choice(_CLASSES)
    safe = rng.random() < 0.5
    sigs = [m[0] for m in methods if not m[0].startswith("_")]
    fname = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") + ".py"
    if zh:
        req = (f"用Python写一个{purpose}。\n\n要求：\n- 类名为{name}" + (f"，参数{', '.join(params)}" if params else "")
               + "".join(f"\n- 方法{s.split('(')[0]}" for s in sigs) + ("\n- 使用锁保证线程安全" if safe else "")
               + "\n- 类和方法都要有文档字符串\n\n写好后保存代码。")
    else:
        req = (f"Write a Python implementation of {purpose}.\n\nRequirements:\n- Class named {name}"
               + (f" with a configurable {' and '.join(params)}" if params else "")
               + "".join(f"\n- Method {s.replace('self, ', '').replace('(self)', '()')}" for s in sigs)
               + ("\n- Thread-safe using a lock" if safe else "") + "\n- Include docstrings for the class and methods"
               + "\n\nSave the code when it is done.")
    lines = [ln for ln in imports.split("\n") if ln]
    if safe:
        lines.append("import threading")
    lines = sorted(set(lines), key=lines.index)
    code = ("\n".join(lines) + "\n\n\n" if lines else "") + f"class {name}:\n    \"\"\"{purpose[0].upper() + purpose[1:]}."
    code += ("\n\n    All methods are safe to call from several threads.\"\"\"\n" if safe else "\"\"\"\n")
    args = "".join(f", {p}" for p in params)
    code += f"\n    def __init__(self{args}):\n        \"\"\"Create the {name}.\"\"\"\n"
    for p in params:
        code += f"        self.{p} = {p}\n"
    for ln in (init.split("\n") if init else []):
        code += f"        {ln}\n"
    if safe:
        code += "        self._lock = threading.Lock()\n"
    if not params and not init and not safe:
        code += "        pass\n"
    for sig, doc, body in methods:
        code += f"\n    def {sig}:\n        \"\"\"{doc}\"\"\"\n"
        calls_own = any(f"self.{s.split('(')[0]}(" in b for s in sigs for b in body)  # locked already inside
        if safe and not sig.startswith("_") and not calls_own:
            code += "        with self._lock:\n" + "".join(f"            {b}\n" for b in body)
        else:
            code += "".join(f"        {b}\n" for b in body)
    ctor = f"{name}(" + ", ".join("10" for _ in params) + ")"
    first = sigs[0].split("(")[0]
    fargs = sigs[0].split("(", 1)[1].rstrip(")").replace("self", "").strip(", ")
    demo_args = ", ".join(_DEMO_ARGS.get(a.split("=")[0].strip(), "1") for a in fargs.split(",") if a.strip())
    usage = f"obj = {ctor}\nobj.{first}({demo_args})"
    desc = ("线程安全的" if safe and zh else "Thread-safe " if safe else "") + (purpose if not zh else name)
    return req, {"language": "python", "filename": fname, "description": desc, "code": code, "usage_example": usage}


CODE_TOOL = _fn("save_file", "Save source code to a file", {
    "language": _s("Programming language"), "filename": _s("File name"), "description": _s("What the code does"),
    "code": _s("The complete source code"), "usage_example": _s("How to use it")},
    ["language", "filename", "description", "code", "usage_example"])
HELDOUT_CODE_TOOL = _fn("write_module", "Write a Python module to disk", {
    "language": _s(), "filename": _s(), "description": _s(), "code": _s("Complete code"), "usage_example": _s()},
    ["language", "filename", "description", "code", "usage_example"])


# ------------------------------------------------------------------------------------------------ records
def _call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _offer(rng: random.Random, pool: list[Tool], must: Tool | None) -> list[dict[str, Any]]:
    k = rng.randint(1, min(4, len(pool)))
    picked = rng.sample([t for t in pool if t is not must], k - (must is not None))
    tools = [t.spec for t in picked] + ([must.spec] if must else [])
    rng.shuffle(tools)
    return tools


def tool_chat(rng: random.Random, kind: str, pool: list[Tool], code_tool: dict[str, Any],
              zh_share: float = 0.35) -> dict[str, Any]:
    """One record of ``kind`` (see :data:`KINDS`) using tools from ``pool``."""
    zh = rng.random() < zh_share
    if kind == "parallel":
        tool = rng.choice([t for t in pool if t.many is not None])
        q, many = tool.many(rng, zh)
        return {"kind": kind, "lang": "zh" if zh else "en", "tools": _offer(rng, pool, tool), "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [_call(tool.name, a) for a in many]}]}
    if kind == "none":
        q, a = _chitchat(rng, zh)
        return {"kind": kind, "lang": "zh" if zh else "en", "tools": _offer(rng, pool, None), "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if kind == "code":
        q, args = _code(rng, zh)
        return {"kind": kind, "lang": "zh" if zh else "en", "tools": [code_tool], "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": "", "tool_calls": [_call(code_tool["function"]["name"], args)]}]}
    tool = rng.choice(pool)
    q, args, result, answer = tool.make(rng, zh)
    msgs: list[dict[str, Any]] = [{"role": "user", "content": q},
                                  {"role": "assistant", "content": "", "tool_calls": [_call(tool.name, args)]}]
    if kind == "result":
        msgs += [{"role": "tool", "content": json.dumps(result, ensure_ascii=False)},
                 {"role": "assistant", "content": answer}]
    elif kind != "single":
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    return {"kind": kind, "lang": "zh" if zh else "en", "tools": _offer(rng, pool, tool), "messages": msgs}


def tool_chats(n: int, seed: int = 0, heldout: bool = False, mix: dict[str, float] | None = None,
               zh_share: float = 0.35) -> list[dict[str, Any]]:
    """``n`` records: training tools (``heldout=False``) or the held-out tools, kinds drawn by ``mix``."""
    mix = mix or DEFAULT_MIX
    bad = set(mix) - set(KINDS)
    if bad:
        raise ValueError(f"unknown kinds {sorted(bad)}; use {', '.join(KINDS)}")
    rng = random.Random(seed * 2 + heldout)
    pool, code_tool = (HELDOUT_TOOLS, HELDOUT_CODE_TOOL) if heldout else (TRAIN_TOOLS, CODE_TOOL)
    kinds, weights = zip(*mix.items())
    return [tool_chat(rng, rng.choices(kinds, weights)[0], pool, code_tool, zh_share) for _ in range(n)]
