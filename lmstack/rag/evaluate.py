"""``lmstack rag eval``: retrieval quality on labelled questions, and, with a model, answer quality.

Questions file: JSONL, one object a line::

    {"question": "How long does standard shipping take?",
     "relevant": [{"source": "faq/shipping.en.md", "contains": "3-5 business days"}]}

``relevant`` lists what answers it: a chunk id (``"faq/shipping.en.md#2"``), or an object matching chunks by
``source`` (exact, or a glob with ``*``) and, optionally, text the chunk ``contains`` (whitespace-insensitive) --
labels that survive re-chunking. Metrics at each ``k``, averaged over questions (binary relevance):

- ``recall@k``: the share of questions with a relevant chunk in the top k (hit rate);
- ``mrr@k``: the mean of 1 / rank of the first relevant chunk (0 when none is in the top k);
- ``ndcg@k``: DCG = sum over the top k of rel_i / log2(i + 1), divided by the ideal DCG of that question (its
  relevant chunks in the index, at most k, all ranked first) -- Järvelin & Kekäläinen 2002.

With a model (``--model``): each question is answered from its top ``k`` chunks (:mod:`lmstack.rag.answer`), and
the report adds ``faithfulness`` (mean share of answer sentences supported by the chunks they cite),
``citation_accuracy`` (the share of citations that point at a relevant chunk) and ``cited`` (the share of answers
citing anything), and against the reference answers (a question's ``answer``, or the ``contains`` text of its
labels) ``exact_match``, token ``f1`` and ``contains`` (:mod:`lmstack.eval.metrics`, citation marks dropped).
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path
from typing import Any, Sequence

from lmstack.errors import DataError
from lmstack.utils.io import iter_jsonl_numbered

MAX_QUESTIONS = 100_000


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: questions file not found")
    out = []
    for i, row in iter_jsonl_numbered(path):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise DataError(f"{path}:{i}: expected an object with a 'question' string")
        rel = row.get("relevant")
        if not isinstance(rel, list) or not rel or not all(
                isinstance(r, str) or (isinstance(r, dict) and isinstance(r.get("source"), str)) for r in rel):
            raise DataError(f"{path}:{i}: 'relevant' must list chunk ids or {{'source', 'contains'?}} objects")
        out.append(row)
        if len(out) > MAX_QUESTIONS:
            raise DataError(f"{path}: more than {MAX_QUESTIONS} questions")
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def is_relevant(chunk: Any, relevant: Sequence[Any]) -> bool:
    for r in relevant:
        if isinstance(r, str):
            if chunk.id == r:
                return True
        elif fnmatch.fnmatchcase(getattr(chunk, "source", "") or chunk.doc_id, r["source"]) and (
                not r.get("contains") or _squeeze(r["contains"]) in _squeeze(chunk.text)):
            return True
    return False


def count_relevant(retriever: Any, relevant: Sequence[Any]) -> int:
    """How many chunks of the index match the labels (the ideal DCG's length)."""
    n = 0
    for r in relevant:
        if isinstance(r, str):
            n += retriever.con.execute("SELECT count(*) FROM chunks WHERE id = ?", (r,)).fetchone()[0]
        else:
            rows = retriever.con.execute("SELECT id, doc_id, text, source FROM chunks WHERE source GLOB ?",
                                         (r["source"],)).fetchall()
            n += sum(1 for _, _, text, _ in rows if not r.get("contains") or _squeeze(r["contains"]) in _squeeze(text))
    return n


def ranking_metrics(rels: Sequence[Sequence[bool]], n_relevant: Sequence[int], ks: Sequence[int]) -> dict[str, float]:
    """recall@k, mrr@k, ndcg@k averaged over questions; ``rels[q]``: relevance of q's ranked results."""
    out: dict[str, float] = {}
    nq = len(rels)
    for k in ks:
        recall = mrr = ndcg = 0.0
        for rel, n_rel in zip(rels, n_relevant):
            top = list(rel[:k])
            recall += any(top)
            first = next((i for i, r in enumerate(top) if r), None)
            mrr += 0.0 if first is None else 1.0 / (first + 1)
            dcg = sum(1.0 / math.log2(i + 2) for i, r in enumerate(top) if r)
            ideal = sum(1.0 / math.log2(i + 2) for i in range(min(max(n_rel, sum(top)), k)))
            ndcg += dcg / ideal if ideal else 0.0
        out[f"recall@{k}"], out[f"mrr@{k}"], out[f"ndcg@{k}"] = recall / nq, mrr / nq, ndcg / nq
    return out


def evaluate(retriever: Any, questions: list[dict[str, Any]], *, ks: Sequence[int] = (1, 3, 5, 10),
             mode: str = "hybrid", llm: Any = None, answer_k: int = 5, max_tokens: int = 256) -> dict[str, Any]:
    """The report (module docstring), overall and per language of the question."""
    from lmstack.rag.analyze import query_lang

    depth = max(ks)
    rels, n_rel, langs, hits_all = [], [], [], []
    for q in questions:
        hits = retriever.search(q["question"], max(depth, answer_k), mode=mode)
        hits_all.append(hits)
        rels.append([is_relevant(h.chunk, q["relevant"]) for h in hits[:depth]])
        n_rel.append(count_relevant(retriever, q["relevant"]))
        langs.append(q.get("lang") or query_lang(q["question"]))
    report: dict[str, Any] = {"questions": len(questions), "mode": mode, **ranking_metrics(rels, n_rel, ks)}
    for lang in sorted(set(langs)):
        idx = [i for i, lg in enumerate(langs) if lg == lang]
        report[lang] = {"questions": len(idx), **ranking_metrics([rels[i] for i in idx], [n_rel[i] for i in idx], ks)}
    if llm is not None:
        report.update(answer_metrics(llm, questions, [h[:answer_k] for h in hits_all], max_tokens=max_tokens))
    return report


def answer_metrics(llm: Any, questions: list[dict[str, Any]], hits: list[list[Any]], *,
                   max_tokens: int = 256) -> dict[str, Any]:
    """Generate grounded answers (greedy) and score faithfulness and citations."""
    from lmstack.rag.answer import citations, faithfulness, groundedness, rag_messages

    from lmstack.eval.metrics import contains, exact_match, token_f1

    prompts = [llm.chat_prompt(rag_messages(q["question"], h)) for q, h in zip(questions, hits)]
    outs = llm.generate(prompts, temperature=0.0, max_tokens=max_tokens)
    faith, grounded, n_cites, n_good, n_citing, answers = [], [], 0, 0, 0, []
    em, f1, has = [], [], []
    for q, h, o in zip(questions, hits, outs):
        text = o.outputs[0].text
        cited = citations(text, len(h))
        n_citing += bool(cited)
        n_cites += len(cited)
        n_good += sum(is_relevant(h[i - 1].chunk, q["relevant"]) for i in cited)
        f = faithfulness(text, h)
        if f is not None:
            faith.append(f)
        g = groundedness(text, h)
        if g is not None:
            grounded.append(g)
        row = {"question": q["question"], "answer": text, "cited": cited, "faithfulness": f, "grounded": g}
        gold = gold_answers(q)
        if gold:
            bare = strip_citations(text)
            row.update(exact_match=exact_match(bare, gold), f1=token_f1(bare, gold), contains=contains(bare, gold))
            em.append(row["exact_match"])
            f1.append(row["f1"])
            has.append(row["contains"])
        answers.append(row)
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return {"faithfulness": mean(faith), "grounded": mean(grounded), "citation_accuracy": n_good / n_cites if n_cites else None,
            "cited": n_citing / len(questions), "exact_match": mean(em), "f1": mean(f1), "contains": mean(has),
            "answered_with_gold": len(em), "answers": answers}


def gold_answers(question: dict[str, Any]) -> list[str]:
    """The reference answers of a labelled question: its ``answer``/``answers`` when given, else the text its
    relevant chunks must contain (the fact the question asks for)."""
    if isinstance(question.get("answers"), list):
        return [a for a in question["answers"] if isinstance(a, str) and a.strip()]
    if isinstance(question.get("answer"), str) and question["answer"].strip():
        return [question["answer"]]
    return [r["contains"] for r in question.get("relevant", []) if isinstance(r, dict) and r.get("contains")]


def strip_citations(text: str) -> str:
    """``text`` without its ``[n]`` citation marks (what exact match and F1 compare)."""
    from lmstack.rag.answer import _CITE

    return re.sub(r"\s+", " ", _CITE.sub(" ", text)).strip()
