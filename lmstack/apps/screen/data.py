"""The screen's synthetic transactions (EN + ZH), written for lmstack: a documented, seeded generator.

Every item is a card or wallet payment with the message that came with it (the payer's memo, or the message the
customer says made them pay). Items come from *scenarios*; the label is the scenario's, never a random draw, so a
perfect screen exists and the errors a model makes are its own:

=================  =====  =====================================================================================
scenario           label  what it looks like
=================  =====  =====================================================================================
everyday           legit  groceries, restaurants, utilities; usual hours, the customer's own device and country
big_purchase       legit  a large electronics / travel payment, with a memo that explains it
travel_abroad      legit  foreign country and often a new device (the hard negatives), memo about the trip
family_transfer    legit  a transfer to a relative with a plain memo
takeover           fraud  account takeover: new device, foreign, odd hour, young-looking account, resale goods
impersonation      fraud  a scam message (bank / police / tax office, "safe account", 安全账户) + a transfer;
                          the payment itself looks ordinary (the hard positives: only the message gives it away)
gift_card_scam     fraud  gift cards / crypto bought under pressure ("read me the codes", 刷单返利)
=================  =====  =====================================================================================

Each scenario has message templates in both languages; a third of them are **held out**: they never appear in
the training split, so dev and test measure paraphrases the classifier has not seen. Splits: ``train`` (seen
templates only), ``dev`` (threshold choice), ``test`` (reported). ``generate(n, seed)`` is deterministic: the
shipped file ``lmstack/apps/screen/data/transactions.jsonl`` is ``generate()`` with the defaults
(``lmstack screen data --out FILE`` writes it again; a test checks they agree).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).with_name("data") / "transactions.jsonl"
LABELS = ("legit", "fraud")
SPLITS = {"train": 0.6, "dev": 0.2, "test": 0.2}

NAMES = {"en": ["Anna", "Ben", "Chloe", "David", "Emma", "Frank", "Grace", "Henry"],
         "zh": ["小王", "李娜", "张伟", "刘洋", "陈静", "杨帆", "赵磊", "黄敏"]}
PLACES = {"en": ["Tokyo", "Lisbon", "Rome", "Bangkok", "Paris", "Seoul"],
          "zh": ["东京", "里斯本", "罗马", "曼谷", "巴黎", "首尔"]}

# scenario -> label, categories, and the feature ranges it draws from
SCENARIOS: dict[str, dict[str, Any]] = {
    "everyday": {"label": "legit", "weight": 40, "categories": ["grocery", "restaurant", "utilities", "pharmacy"],
                 "amount": (4, 120), "night": 0.05, "new_device": 0.05, "foreign": 0.03, "age": (60, 3000)},
    "big_purchase": {"label": "legit", "weight": 12, "categories": ["electronics", "travel", "furniture"],
                     "amount": (400, 3000), "night": 0.1, "new_device": 0.15, "foreign": 0.05, "age": (90, 3000)},
    "travel_abroad": {"label": "legit", "weight": 12, "categories": ["travel", "restaurant", "hotel"],
                      "amount": (30, 900), "night": 0.3, "new_device": 0.5, "foreign": 1.0, "age": (90, 3000)},
    "family_transfer": {"label": "legit", "weight": 10, "categories": ["transfer"],
                        "amount": (50, 1500), "night": 0.1, "new_device": 0.05, "foreign": 0.1, "age": (60, 3000)},
    "takeover": {"label": "fraud", "weight": 9, "categories": ["electronics", "gift_cards", "jewelry"],
                 "amount": (300, 4000), "night": 0.7, "new_device": 0.9, "foreign": 0.7, "age": (1, 3000)},
    "impersonation": {"label": "fraud", "weight": 9, "categories": ["transfer"],
                      "amount": (200, 5000), "night": 0.15, "new_device": 0.05, "foreign": 0.1, "age": (60, 3000)},
    "gift_card_scam": {"label": "fraud", "weight": 8, "categories": ["gift_cards", "crypto"],
                       "amount": (100, 2000), "night": 0.2, "new_device": 0.1, "foreign": 0.05, "age": (60, 3000)},
}

# scenario -> lang -> templates; the LAST third of each list (rounded down, at least one) is held out of training
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "everyday": {
        "en": ["weekly groceries", "dinner with {name}", "electricity bill for March", "coffee and a sandwich",
               "pharmacy, cold medicine", "lunch at the office canteen"],
        "zh": ["每周买菜", "和{name}吃晚饭", "三月份电费", "咖啡和三明治", "药店买感冒药", "公司食堂午饭"]},
    "big_purchase": {
        "en": ["new laptop for work", "flights for the summer holiday", "sofa for the new flat",
               "replacing my broken phone", "annual train pass"],
        "zh": ["工作用的新笔记本电脑", "暑假机票", "新家的沙发", "换掉摔坏的手机", "全年火车月票"]},
    "travel_abroad": {
        "en": ["hotel in {place} for our trip", "taxi from the airport in {place}", "museum tickets in {place}",
               "dinner on holiday in {place}", "ski rental, family trip"],
        "zh": ["{place}旅行的酒店", "{place}机场打车", "{place}博物馆门票", "在{place}度假吃饭", "全家滑雪租装备"]},
    "family_transfer": {
        "en": ["rent share to {name}", "birthday money for {name}", "paying {name} back for the concert",
               "school fees for my daughter", "monthly support for mum"],
        "zh": ["转给{name}的房租", "给{name}的生日红包", "还{name}演唱会的钱", "女儿的学费", "给妈妈的生活费"]},
    "takeover": {
        "en": ["", "order", "urgent order ship fast", "gift", "buy now", "2x same item"],
        "zh": ["", "订单", "加急发货", "礼物", "马上买", "同款两件"]},
    "impersonation": {
        "en": ["the bank's security team said my account is compromised, moving money to the safe account",
               "police officer on the phone told me to transfer my savings for the investigation",
               "tax office says I owe a fine and will be arrested today unless I pay",
               "caller from the fraud department asked me to move funds to a protected account",
               "my grandson called from jail and needs bail money right now, do not tell his parents"],
        "zh": ["银行安全部门说我的账户有风险，要把钱转到安全账户", "电话里的警察让我把存款转过去配合调查",
               "税务局说我欠罚款，今天不交就会被逮捕", "反诈中心的人让我把资金转到保护账户",
               "孙子从看守所打电话说急需保释金，不让告诉他父母"]},
    "gift_card_scam": {
        "en": ["buying gift cards, the caller wants me to read him the codes",
               "my boss emailed asking for 10 store cards urgently for clients",
               "crypto investment guaranteed 30% per week, friend from the dating app",
               "tech support said to pay in vouchers to fix my computer virus",
               "part-time job pays commission after I top up this card"],
        "zh": ["买礼品卡，对方要我把卡号念给他", "老板发邮件急着要十张购物卡送客户",
               "网恋对象介绍的数字货币投资，每周保证收益百分之三十", "电脑客服说病毒要用充值卡付费修复",
               "刷单返利兼职，先充值这张卡才能拿佣金"]},
}


def heldout_templates(scenario: str, lang: str) -> set[str]:
    t = TEMPLATES[scenario][lang]
    k = max(1, len(t) // 3)
    return set(t[-k:])


def render(item: dict[str, Any]) -> str:
    """The one text the classifier and the LLM both read: the payment's fields, then its message."""
    lang = item["lang"]
    flags = [f"amount {item['amount']:.2f} {item['currency']}", f"category {item['category']}",
             f"hour {item['hour']:02d}", "new device" if item["new_device"] else "known device",
             "foreign country" if item["foreign"] else "home country", f"account age {item['account_age_days']} days"]
    msg = item["message"] or ("(no message)" if lang == "en" else "（无留言）")
    return "; ".join(flags) + f"; message: {msg}"


def _item(rng: random.Random, idx: int, scenario: str, lang: str, split: str) -> dict[str, Any]:
    s = SCENARIOS[scenario]
    held = heldout_templates(scenario, lang)
    pool = [t for t in TEMPLATES[scenario][lang] if split != "train" or t not in held]
    template = rng.choice(pool)
    msg = template.format(name=rng.choice(NAMES[lang]), place=rng.choice(PLACES[lang]))
    lo, hi = s["amount"]
    amount = round(min(hi, lo * (hi / lo) ** rng.random()), 2)  # log-uniform in [lo, hi]
    night = rng.random() < s["night"]
    hour = rng.choice([0, 1, 2, 3, 4, 5]) if night else rng.randint(7, 22)
    a_lo, a_hi = s["age"]
    age = int(a_lo * (a_hi / a_lo) ** rng.random())
    item = {"id": f"tx{idx:05d}", "lang": lang, "scenario": scenario, "label": s["label"], "split": split,
            "amount": amount, "currency": "USD" if lang == "en" else "CNY", "category": rng.choice(s["categories"]),
            "hour": hour, "new_device": rng.random() < s["new_device"], "foreign": rng.random() < s["foreign"],
            "account_age_days": age, "message": msg, "heldout_template": template in held}
    item["text"] = render(item)
    return item


def generate(n: int = 2000, seed: int = 2) -> list[dict[str, Any]]:
    """``n`` items: scenario by its weight, language 50/50, split 60/20/20 (train items never use a held-out
    template). Deterministic in ``(n, seed)``."""
    rng = random.Random(seed)
    names, weights = list(SCENARIOS), [SCENARIOS[s]["weight"] for s in SCENARIOS]
    splits, split_w = list(SPLITS), list(SPLITS.values())
    return [_item(rng, i, rng.choices(names, weights)[0], rng.choice(("en", "zh")), rng.choices(splits, split_w)[0])
            for i in range(n)]


def write(path: str | Path, n: int = 2000, seed: int = 2) -> Path:
    from lmstack.utils.io import atomic_write_text
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate(n, seed)))
    return p


def read(path: str | Path = SHIPPED) -> list[dict[str, Any]]:
    """Items of a screen data file (untrusted: size-capped, each record checked)."""
    from lmstack.errors import DataError
    from lmstack.model.classify import read_labelled

    rows = read_labelled(path, what="screen data")
    for i, r in enumerate(rows, 1):
        if r["label"] not in LABELS:
            raise DataError(f"{path}: record {i}: label {r['label']!r}; expected one of {', '.join(LABELS)}")
        if r.get("split") not in SPLITS:
            raise DataError(f"{path}: record {i}: split {r.get('split')!r}; expected one of {', '.join(SPLITS)}")
    return rows
