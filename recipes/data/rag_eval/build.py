"""Rebuild this labelled retrieval set from the shop knowledge base (recipes/data/shop, CC0-1.0).

    PYTHONPATH=. python recipes/data/rag_eval/build.py

docs/: the shop's pages as markdown files (policies, one FAQ page per topic and language, one product page per
product and language), exactly what ``lmstack.apps.support.kb.kb_documents`` renders. FAQ pages show only the
first way of asking each question.
questions.jsonl: the held-out (last) way of asking each FAQ entry, English and Chinese, labelled with the FAQ
page and the answer text the relevant chunk must contain -- paraphrases that never appear in the documents.
"""

import json
import shutil
from pathlib import Path

from lmstack.apps.support.kb import LANGS, kb_documents, load_kb

here = Path(__file__).resolve().parent
kb = load_kb()
shutil.rmtree(here / "docs", ignore_errors=True)
for d in kb_documents(kb):
    out = here / "docs" / (d["id"] + ".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(d["text"], encoding="utf-8")
with open(here / "questions.jsonl", "w", encoding="utf-8") as f:
    for e in kb.faqs:
        for lang in LANGS:
            row = {"question": e[lang]["q"][-1], "lang": lang, "id": f"{e['id']}.{lang}",
                   "relevant": [{"source": f"faq/{e.get('topic', 'general')}.{lang}.md", "contains": e[lang]["a"]}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
