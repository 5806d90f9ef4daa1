"""Training data for retrieval on this set that never touches its held-out questions (questions.jsonl):

    PYTHONPATH=. python recipes/data/rag_eval/build_train.py

train_questions.jsonl: the FAQ's other ways of asking (all but the first, which the FAQ pages show, and the last,
which is held out), English and Chinese, labelled like questions.jsonl -- for `lmstack rag fit-reranker` and as
question -> passage pairs for `lmstack rag train-embedder`.
parallel.jsonl: English <-> Chinese pairs written for the shop (recipes/data/shop, CC0-1.0): each FAQ entry's
ways of asking (the held-out last one excluded) and answer, each product's name, description and facts, and
each policy section whose English and Chinese pages have the same headings; plus each FAQ question (held-out
ones excluded) with its own entry as it is written on the FAQ page (`Q: ...\\nA: ...`).
"""

import json
import re
from pathlib import Path

from lmstack.apps.support.dialogues import product_facts
from lmstack.apps.support.kb import LANGS, load_kb

here = Path(__file__).resolve().parent
kb = load_kb()


def write(name, rows):
    with open(here / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(rows)


questions = []
for e in kb.faqs:
    for lang in LANGS:
        for q in e[lang]["q"][1:-1]:
            questions.append({"question": q, "lang": lang, "id": f"{e['id']}.{lang}",
                              "relevant": [{"source": f"faq/{e.get('topic', 'general')}.{lang}.md",
                                            "contains": e[lang]["a"]}]})

pairs = []
for e in kb.faqs:
    en, zh = e["en"], e["zh"]
    for a, b in zip(en["q"][:-1], zh["q"][:-1]):
        pairs.append({"anchor": a, "positive": b, "kind": "translation"})
    pairs.append({"anchor": en["a"], "positive": zh["a"], "kind": "translation"})
    for lang in LANGS:
        entry = f"Q: {e[lang]['q'][0]}\nA: {e[lang]['a']}"
        for q in e[lang]["q"][1:-1]:
            pairs.append({"anchor": q, "positive": entry, "kind": "faq"})
        other = "zh" if lang == "en" else "en"
        pairs.append({"anchor": e[lang]["q"][1], "positive": f"Q: {e[other]['q'][0]}\nA: {e[other]['a']}",
                      "kind": "faq-crosslingual"})
for p in kb.products:
    pairs.append({"anchor": p["name"]["en"], "positive": p["name"]["zh"], "kind": "translation"})
    pairs.append({"anchor": p["description"]["en"], "positive": p["description"]["zh"], "kind": "translation"})
    fe, fz = product_facts(p, "en"), product_facts(p, "zh")
    for k in fe:
        if k in fz:
            pairs.append({"anchor": fe[k], "positive": fz[k], "kind": "translation"})


def sections(text):
    parts = re.split(r"^## ", text, flags=re.M)
    return [s.strip() for s in parts[1:]]


for name, by_lang in sorted(kb.policies.items()):
    se, sz = sections(by_lang.get("en", "")), sections(by_lang.get("zh", ""))
    if len(se) == len(sz):
        pairs += [{"anchor": a, "positive": b, "kind": "translation"} for a, b in zip(se, sz)]

heldout = {json.loads(line)["question"] for line in open(here / "questions.jsonl", encoding="utf-8")}
assert not heldout & {q["question"] for q in questions}
assert not heldout & {t for p in pairs for t in (p["anchor"], p["positive"])}
print(write("train_questions.jsonl", questions), "training questions,", write("parallel.jsonl", pairs), "pairs")
