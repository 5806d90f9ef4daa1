"""Support QA pairs and short dialogues built from the Larkspur Home knowledge base, with a held-out split.

Every fact (an FAQ entry, or one attribute of one product) can be asked several ways. The LAST way of asking
is held out: it never appears in fine-tuning data (nor in the KB pages used for pretraining), so the
evaluation measures whether the model answers a *paraphrase it has not seen* about a fact it has learned.
For FAQ entries the second-to-last way of asking is held out too, as a *dev* question (the reported
evaluation never sees it; the assistant's answer ranker is fit on such questions), and so is the last
greeting and out-of-scope question of each language (the ranker learns when to greet or decline).

Outputs (deterministic for a given seed):

- ``train``   chat records ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...],
  "facts": [QA item ids the answers state]}``:
  one single-turn record per training question, a few greetings and out-of-scope refusals, and short
  two-turn dialogues joining two facts of the same language;
- ``heldout`` ``{"id", "lang", "topic", "question", "answer", "messages"}`` rows (``messages`` holds the system
  prompt and the held-out question; ``answer`` is the reference for exact match / ROUGE-L);
- ``dev``     rows of the same shape: the FAQ dev paraphrases and the held-out greetings / out-of-scope
  questions (ids ``reply/greeting.en`` ...);
- ``reply``   rows of the same shape: more greetings and out-of-scope questions (:data:`HELDOUT_REPLIES`, ids
  ``reply/out-of-scope.zh#2`` ...), in neither training nor dev: how the assistant greets and declines is
  measured on them (the eval stage's ``support_reply`` task).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lmstack.apps.support.kb import ShopKB, fmt_num

SYSTEM_PROMPT = "You are the support assistant of Larkspur Home, an online shop. Answer briefly."

# attribute -> lang -> (question templates, the last one held out; answer template)
PRODUCT_QUESTIONS: dict[str, dict[str, tuple[list[str], str]]] = {
    "price": {
        "en": (["How much is the {name}?", "What does the {name} cost?", "What is the price of the {name}?",
                "How much would I pay for the {name}?"], "The {name} costs ${price}."),
        "zh": (["{name}多少钱？", "{name}的价格是多少？", "{name}卖多少钱？", "买一个{name}要花多少钱？"],
               "{name}售价{price}美元。"),
    },
    "warranty": {
        "en": (["What is the warranty on the {name}?", "How long is the {name} under warranty?",
                "Does the {name} have a warranty?", "For how many years is the {name} covered?"],
               "The {name} has a {warranty}-year limited warranty."),
        "zh": (["{name}保修多久？", "{name}的保修期是多长？", "{name}有保修吗？", "{name}能保修几年？"],
               "{name}享有{warranty}年有限保修。"),
    },
    "material": {
        "en": (["What is the {name} made of?", "What material is the {name}?", "Which material does the {name} use?",
                "What is the {name} constructed from?"], "The {name} is made of {material}."),
        "zh": (["{name}是什么材质的？", "{name}用什么材料做的？", "{name}的材质是什么？", "{name}是用什么做成的？"],
               "{name}采用{material}制成。"),
    },
    "colors": {
        "en": (["What colors does the {name} come in?", "Which colors are available for the {name}?",
                "Is the {name} available in different colors?", "What color options does the {name} have?"],
               "The {name} comes in {colors}."),
        "zh": (["{name}有哪些颜色？", "{name}有什么颜色可选？", "{name}有几种颜色？", "{name}可以选哪些颜色？"],
               "{name}有{colors}可选。"),
    },
    "weight": {
        "en": (["How much does the {name} weigh?", "What is the weight of the {name}?", "How heavy is the {name}?",
                "Is the {name} heavy? What does it weigh?"], "The {name} weighs {weight} kg."),
        "zh": (["{name}有多重？", "{name}的重量是多少？", "{name}重不重？", "{name}大概多少公斤？"],
               "{name}重{weight}公斤。"),
    },
}

GREETINGS = {
    "en": (["Hi", "Hello!", "Hey there", "Good morning", "Hi, can you help me?"],
           "Hello! I am the Larkspur Home support assistant. How can I help you with your order today?"),
    "zh": (["你好", "您好！", "在吗？", "早上好", "你好，能帮我一下吗？"],
           "您好！我是云雀家居的客服助手，请问有什么可以帮您？"),
}
OUT_OF_SCOPE = {
    "en": (["Can you help me with my taxes?", "What's the best way to learn Spanish?", "Write me a poem about cats.",
            "Who will win the election?", "Can you recommend a good movie?"],
           "Sorry, I can only help with Larkspur Home orders, products and policies."),
    "zh": (["能帮我报税吗？", "学西班牙语最好的方法是什么？", "给我写一首关于猫的诗。", "谁会赢得选举？", "能推荐一部好电影吗？"],
           "抱歉，我只能解答云雀家居的订单、商品和政策相关问题。"),
}
# Never in training nor in the reader's dev set: how the assistant greets and declines, measured (eval stage,
# task support_reply). General-knowledge questions are out of scope here on purpose: with the shop's system
# prompt the assistant declines them; without it (the general check) the model should still answer them.
HELDOUT_REPLIES = {
    "greeting": {
        "en": ["Good evening!", "Hello, is anyone there?", "Hey!", "Hi there, I have a question."],
        "zh": ["晚上好！", "你好，有人吗？", "嗨！", "您好，我想咨询一下。"],
    },
    "out-of-scope": {
        "en": ["What will the weather be like tomorrow?", "Can you write my history essay for me?",
               "What is the meaning of life?", "Tell me a joke about programmers.", "How do I fix my car's engine?",
               "Which stocks should I buy this year?"],
        "zh": ["明天天气怎么样？", "你能帮我写历史论文吗？", "人生的意义是什么？", "给我讲个程序员的笑话。",
               "我的汽车发动机坏了怎么修？", "今年应该买哪些股票？"],
    },
}


@dataclass
class QAItem:
    id: str
    lang: str
    topic: str
    questions: list[str]  # all ways of asking; the last is held out (and the one before it, for dev, if n_dev)
    answer: str
    n_dev: int = 0

    @property
    def train_questions(self) -> list[str]:
        return self.questions[:-1 - self.n_dev]

    @property
    def dev_questions(self) -> list[str]:
        return self.questions[len(self.questions) - 1 - self.n_dev:-1]

    @property
    def heldout_question(self) -> str:
        return self.questions[-1]


def faq_dev_count(questions: list[str]) -> int:
    """How many ways of asking an FAQ entry are held out as dev questions (before the held-out last one)."""
    return 1 if len(questions) >= 4 else 0


def _product_values(p: dict[str, Any], lang: str) -> dict[str, Any]:
    return {"name": p["name"][lang], "price": fmt_num(p["price"]), "warranty": p["warranty_years"],
            "material": p["material"][lang], "colors": p["colors"][lang], "weight": fmt_num(p["weight_kg"])}


def product_facts(p: dict[str, Any], lang: str) -> dict[str, str]:
    """attribute -> the sentence that states it (``The Cedar Cutting Board costs $34.``)."""
    values = _product_values(p, lang)
    return {attr: by_lang[lang][1].format(**values) for attr, by_lang in PRODUCT_QUESTIONS.items()}


def qa_items(kb: ShopKB) -> list[QAItem]:
    """One item per fact and language: every FAQ entry, and every (product, attribute) pair."""
    items: list[QAItem] = []
    for e in kb.faqs:
        for lang in ("en", "zh"):
            qs = list(e[lang]["q"])
            items.append(QAItem(f"faq/{e['id']}.{lang}", lang, e.get("topic", "general"), qs, e[lang]["a"],
                                n_dev=faq_dev_count(qs)))
    for p in kb.products:
        for attr, by_lang in PRODUCT_QUESTIONS.items():
            for lang, (templates, answer) in by_lang.items():
                values = _product_values(p, lang)
                items.append(QAItem(f"product/{p['sku']}/{attr}.{lang}", lang, f"product-{attr}",
                                    [t.format(**values) for t in templates], answer.format(**values)))
    return items


def _chat(*turns: str, system: str = SYSTEM_PROMPT, facts: list[str] | None = None) -> dict[str, Any]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    rec: dict[str, Any] = {"messages": msgs}
    if facts is not None:
        rec["facts"] = facts  # the QA items the answers state (for grounding in retrieved passages)
    return rec


def build_support_data(kb: ShopKB, seed: int = 0, n_dialogues: int = 200,
                       system_prompt: str = SYSTEM_PROMPT, reply_repeat: int = 1,
                       faq_repeat: int = 1) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [chat records], "heldout": [QA rows], "dev": [QA rows], "reply": [QA rows]}`` -- see the
    module docstring (``reply``: held-out greetings and out-of-scope questions, :data:`HELDOUT_REPLIES`).
    ``reply_repeat`` / ``faq_repeat``: copies of each greeting / out-of-scope chat and of each single-turn FAQ
    chat (the mix: product facts are ~3 in 4 of the chats, while most questions customers ask are FAQ ones)."""
    rng = random.Random(seed)
    items = qa_items(kb)
    train: list[dict[str, Any]] = []
    for it in items:
        copies = faq_repeat if it.id.startswith("faq/") else 1
        for q in it.train_questions:
            train.extend(_chat(q, it.answer, system=system_prompt, facts=[it.id]) for _ in range(copies))
    dev: list[dict[str, Any]] = []
    for name, table in (("greeting", GREETINGS), ("out-of-scope", OUT_OF_SCOPE)):
        for lang, (qs, a) in table.items():
            for q in qs[:-1]:
                train.extend(_chat(q, a, system=system_prompt, facts=[]) for _ in range(reply_repeat))
            dev.append({"id": f"reply/{name}.{lang}", "lang": lang, "topic": name, "question": qs[-1], "answer": a,
                        "messages": _chat(qs[-1], system=system_prompt)["messages"]})
    by_lang: dict[str, list[QAItem]] = {}
    for it in items:
        by_lang.setdefault(it.lang, []).append(it)
    for k in range(n_dialogues):
        lang = ("en", "zh")[k % 2]
        a, b = rng.sample(by_lang[lang], 2)
        train.append(_chat(rng.choice(a.train_questions), a.answer, rng.choice(b.train_questions), b.answer,
                           system=system_prompt, facts=[a.id, b.id]))
    rng.shuffle(train)
    heldout = [
        {"id": it.id, "lang": it.lang, "topic": it.topic, "question": it.heldout_question, "answer": it.answer,
         "messages": _chat(it.heldout_question, system=system_prompt)["messages"]}
        for it in items
    ]
    dev = [{"id": it.id, "lang": it.lang, "topic": it.topic, "question": q, "answer": it.answer,
            "messages": _chat(q, system=system_prompt)["messages"]}
           for it in items for q in it.dev_questions] + dev
    replies = {"greeting": GREETINGS, "out-of-scope": OUT_OF_SCOPE}
    reply = [{"id": f"reply/{name}.{lang}#{i}", "lang": lang, "topic": name, "question": q,
              "answer": replies[name][lang][1], "messages": _chat(q, system=system_prompt)["messages"]}
             for name, by_lang in HELDOUT_REPLIES.items() for lang, qs in by_lang.items() for i, q in enumerate(qs)]
    return {"train": train, "heldout": heldout, "dev": dev, "reply": reply}


def sample_heldout(rows: list[dict[str, Any]], n: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """A deterministic subset of ``n`` held-out rows, balanced over languages and topics (all when n is None)."""
    if n is None or n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["lang"], r["topic"].split("-")[0]), []).append(r)
    for g in groups.values():
        rng.shuffle(g)
    out: list[dict[str, Any]] = []
    keys = sorted(groups)
    while len(out) < n:  # round-robin over (lang, faq|product) groups
        for key in keys:
            if groups[key] and len(out) < n:
                out.append(groups[key].pop())
    return sorted(out, key=lambda r: r["id"])
