"""Grounded answers by selection: the assistant answers with the knowledge-base sentence, among those of the
retrieved passages, that a learned ranker scores highest (an extractive reader).

A few-million-parameter model trained for minutes on a CPU does not yet copy facts out of its prompt
reliably (docs/quickstart.md measures its free-running answers), so the assistant's default answer is chosen,
not written. The candidates (:func:`candidate_set`) are

- the answer units of the retrieved passages: an FAQ passage's answer, each fact sentence of a product
  passage, each sentence of a policy passage;
- the shop's fixed greeting and out-of-scope replies in the question's language.

Every answer is therefore a sentence the shop wrote (no invented prices), and a wrong answer is a real
sentence about the wrong thing. Each candidate gets these features (:meth:`Reader.features`):

``lm``        the model's mean log-probability per token of the candidate (+ end-of-turn marker) as the
              assistant's reply to the same prompt it was fine-tuned and evaluated with (system prompt +
              passages + conversation);
``overlap``   the fraction of the question's index terms (:func:`lmstack.rag.terms`: English stems, Chinese
              character bigrams) the candidate contains;
``dense``     the cosine similarity of question and candidate under the index's sentence embedder, for the
              languages it reads (0 otherwise; optional, the ``rag`` extra);
``rank2`` ``rank3`` ``rank_more``  the retrieval rank of the candidate's passage (rank 1 is the baseline);
``reply``     1 for the fixed greeting / out-of-scope replies.

and the answer is the candidate with the highest ``sum w_f * x_f`` (:class:`lmstack.rag.rerank.LinearRanker`).
The weights are fit by the recipe's ``reader`` stage on held-out *dev* questions (never the reported ones);
without a fitted ranker the model's likelihood alone decides (``{"lm": 1}``). ``mode="generate"`` keeps free
generation (what ``lmstack serve`` alone does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lmstack.apps.support.dialogues import GREETINGS, OUT_OF_SCOPE

_SENT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")  # "1.2 kg" stays whole


def answer_units(chunk: Any) -> list[str]:
    """The sentences of one passage that could be a whole answer."""
    text = chunk.text.strip()
    if chunk.id.startswith("faq/") and "\nA: " in text:
        return [text.split("\nA: ", 1)[1].strip()]
    if chunk.id.startswith("product/") and "\n" in text:
        text = text.split("\n", 1)[1]  # the fact sentences (the first line is name + description)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "|"))]
    return [s.strip() for ln in lines for s in _SENT.split(ln) if len(s.strip()) > 3]


@dataclass(frozen=True)
class Candidate:
    """One possible answer: its text, the retrieval rank of the passage it comes from (0 for a fixed reply)
    and that passage's chunk id ("" for a fixed reply)."""

    text: str
    rank: int
    chunk_id: str = ""


def candidate_set(hits: Sequence[Any], lang: str) -> list[Candidate]:
    """Answer units of the passages, in rank order, then the fixed greeting and refusal (no duplicate texts)."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for h in hits:
        for u in answer_units(h.chunk):
            if u not in seen:
                seen.add(u)
                out.append(Candidate(u, int(h.rank), h.chunk.id))
    for table in (GREETINGS, OUT_OF_SCOPE):
        if table[lang][1] not in seen:
            seen.add(table[lang][1])
            out.append(Candidate(table[lang][1], 0))
    return out


def candidates(hits: Sequence[Any], lang: str, cite: bool = False) -> list[str]:
    """The texts of :func:`candidate_set`; ``cite``: each passage's units end with its citation marker as a
    cited answer does (`` [2]`` for the second passage shown), so a quote carries on into the right citation."""
    return quotable(hits, candidate_set(hits, lang), cite)


def quotable(hits: Sequence[Any], cands: Sequence[Candidate], cite: bool) -> list[str]:
    """The texts of ``cands``, with `` [n]`` after each passage unit when ``cite`` (n: the passage's place in
    ``hits``, the number the prompt shows it under)."""
    if not cite:
        return [c.text for c in cands]
    place = {}
    for i, h in enumerate(hits, 1):
        place.setdefault(h.chunk.id, i)
    return [f"{c.text} [{place[c.chunk_id]}]" if c.chunk_id in place else c.text for c in cands]


FEATURES = ("lm", "overlap", "dense", "rank2", "rank3", "rank_more", "reply")
LM_ONLY = {"lm": 1.0}


def overlap(question_terms: set[str], text: str) -> float:
    """Fraction of the question's distinct index terms that occur in ``text``."""
    if not question_terms:
        return 0.0
    from lmstack.rag import terms

    return len(question_terms & set(terms(text))) / len(question_terms)


class Reader:
    """Scores the candidates of a turn and answers with the best one (module docstring).

    ``lm``: an :class:`lmstack.eval.lm.EvalLM` (None for a ranker that does not use ``lm``);
    ``ranker``: a :class:`lmstack.rag.rerank.LinearRanker` (default: the likelihood alone);
    ``embedder``: a sentence-transformers model for the ``dense`` feature, reading ``dense_langs``."""

    def __init__(self, lm: Any = None, ranker: Any = None, embedder: Any = None,
                 dense_langs: Sequence[str] | None = ("en",)):
        from lmstack.rag.rerank import LinearRanker

        self.lm = lm
        self.ranker = ranker if ranker is not None else LinearRanker(LM_ONLY)
        if self.ranker.uses("lm") and lm is None:
            raise ValueError("this ranker weighs the model's likelihood: give the Reader a model")
        self.embedder = embedder
        self.dense_langs = None if dense_langs is None else set(dense_langs)
        self._vecs: dict[str, Any] = {}
        tok = getattr(lm, "tok", None)  # lmstack.tokenizer.Tokenizer
        template = getattr(tok, "chat_template", None) or ""
        eos = tok.id_to_token(tok.eos_token_id) if tok is not None and tok.eos_token_id is not None else None
        self.end = "<|im_end|>" if "<|im_end|>" in str(template) else (eos if isinstance(eos, str) else "")

    @classmethod
    def load(cls, model: str | Path | None, adapter: str | Path | None = None, device: str | None = None,
             ranker: Any = None, embedder: Any = "auto", llm: Any = None) -> "Reader":
        """``ranker``: a ranker file (the reader stage's ``ranker.json``), a LinearRanker, or None (likelihood
        alone). ``embedder="auto"`` loads the one the ranker was fit with when it weighs ``dense``; if that
        is not installed, the feature is dropped with a warning (answers then rank without it). ``llm``: a
        loaded serving :class:`lmstack.serve.llm.LLM` whose model scores the candidates (one load of the
        weights for serving and scoring); otherwise ``model`` (+ ``adapter``) is loaded."""
        from lmstack.rag.rerank import LinearRanker

        if isinstance(ranker, (str, Path)):
            ranker = LinearRanker.load(ranker)
        ranker = ranker if ranker is not None else LinearRanker(LM_ONLY)
        dense_langs = ranker.info.get("dense_langs", ["en"])
        if embedder == "auto":
            embedder = None
            if ranker.uses("dense"):
                from lmstack.errors import ConfigError
                from lmstack.rag.dense import DEFAULT_EMBEDDER, load_embedder

                try:
                    from lmstack.utils.device import resolve_device

                    embedder = load_embedder(ranker.info.get("embedder") or DEFAULT_EMBEDDER,
                                             device=str(resolve_device(device)))
                except ConfigError as e:
                    import warnings

                    warnings.warn(f"the ranker weighs sentence-embedding similarity, but {e}; answering without "
                                  "that feature", stacklevel=2)
                    ranker = LinearRanker({k: v for k, v in ranker.weights.items() if k != "dense"}, ranker.info)
        lm = None
        if ranker.uses("lm"):
            if model is None:
                raise ValueError("this ranker weighs the model's likelihood: give a model directory")
            from lmstack.eval.lm import EvalLM

            if llm is not None:  # the served model itself (a LoRA adapter is merged into it, prefix KV is passed)
                lm = EvalLM(llm.model, llm.tokenizer, model_dir=model and str(model), adapter_runtime=llm.adapter)
            else:
                lm = EvalLM.load(model, adapter=adapter, device=device)
        return cls(lm, ranker, embedder, dense_langs)

    # ------------------------------------------------------------------ features
    def scores(self, prompt: str, cands: Sequence[str]) -> list[float]:
        """Mean log-probability per token of each candidate (+ the end-of-turn marker) after ``prompt``."""
        reqs = [self.lm.encode_pair(prompt, c + self.end) for c in cands]
        return [s / max(1, len(cont)) for (s, _), (_, cont) in zip(self.lm.loglikelihood_tokens(reqs), reqs)]

    def _dense(self, question: str, texts: Sequence[str]) -> list[float]:
        from lmstack.rag.dense import encode

        todo = [t for t in dict.fromkeys([question, *texts]) if t not in self._vecs]
        if todo:
            for t, v in zip(todo, encode(self.embedder, todo)):
                self._vecs[t] = v
            if len(self._vecs) > 50_000:  # a long-running server: keep the cache bounded
                self._vecs = {t: self._vecs[t] for t in [question, *texts]}
        q = self._vecs[question]
        return [float(self._vecs[t] @ q) for t in texts]

    def features(self, prompt: str, question: str, cands: Sequence[Candidate],
                 names: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Feature rows of ``cands`` (module docstring); ``names`` limits which are computed (default: those
        the ranker weighs)."""
        from lmstack.rag import query_lang, terms

        want = set(names if names is not None else [f for f in FEATURES if self.ranker.uses(f)])
        rows: list[dict[str, float]] = [{"rank2": float(c.rank == 2), "rank3": float(c.rank == 3),
                                         "rank_more": float(c.rank > 3), "reply": float(c.rank == 0)} for c in cands]
        texts = [c.text for c in cands]
        if "lm" in want and cands:
            for r, x in zip(rows, self.scores(prompt, texts)):
                r["lm"] = x
        if "overlap" in want:
            qt = set(terms(question))
            for r, t in zip(rows, texts):
                r["overlap"] = overlap(qt, t)
        if "dense" in want and self.embedder is not None and cands:
            lang = query_lang(question)
            sims = self._dense(question, texts) if self.dense_langs is None or lang in self.dense_langs \
                else [0.0] * len(texts)
            for r, x in zip(rows, sims):
                r["dense"] = x
        return rows

    # ------------------------------------------------------------------ answers
    def ranked(self, prompt: str, question: str, hits: Sequence[Any]) -> list[tuple[Candidate, float]]:
        """The candidates of ``hits`` with their scores, best first."""
        from lmstack.rag import query_lang

        cands = candidate_set(hits, query_lang(question))
        return [(cands[i], s) for i, s in self.ranker.order(self.features(prompt, question, cands))]

    def answer(self, prompt: str, question: str, hits: Sequence[Any]) -> str:
        """The best candidate's text for the turn ``question`` asked with ``prompt`` over ``hits``."""
        best = self.ranked(prompt, question, hits)
        return best[0][0].text if best else ""


def quote_prior(reader: Reader, question: str, hits: Sequence[Any], weight: float,
                cite: bool = False) -> tuple[list[str], list[float]]:
    """The texts an answer to ``question`` may quote (:func:`candidates` of ``hits``) and, for reader-guided
    decoding, their weights: ``weight`` times the ranker's log-probability of each (a log-softmax over the
    candidates of the listwise ranker's scores, :class:`lmstack.rag.rerank.LinearRanker`), so the best-ranked
    text gets 0 and the others less. Grounded decoding with these weights (``CopyFrom.weights``,
    :class:`lmstack.serve.logits.CopyBias`) is a product of the model and the ranker where quotes part ways.
    ``reader``: a reader whose ranker does not weigh the model (its likelihood would need a pass per text);
    ``cite``: the texts end with their passage's citation marker (:func:`candidates`)."""
    import torch

    from lmstack.rag import query_lang

    if reader.ranker.uses("lm"):
        raise ValueError("the quote prior ranks the answer units without the model; this ranker weighs the "
                         "model's likelihood: use the reader stage's no_model.json")
    cands = candidate_set(hits, query_lang(question))
    if not cands:
        return [], []
    scores = torch.tensor(reader.ranker.scores(reader.features("", question, cands)), dtype=torch.float64)
    logp = torch.log_softmax(scores, 0)
    return quotable(hits, cands, cite), (weight * logp).clamp(min=-100.0).tolist()


def quote_texts(hits: Sequence[Any], question: str, *, lang: str | None = None, prior: Reader | None = None,
                weight: float = 0.0, cite: bool = False) -> tuple[list[str], list[float] | None]:
    """What grounded decoding may quote for ``question``: the :func:`candidates` of ``hits`` (in ``lang``,
    default the question's) and, with a no-model ``prior`` reader, their :func:`quote_prior` weights (else
    None). The assistant, its server and the quickstart's evaluation build their ``copy`` texts through here."""
    if prior is not None:
        return quote_prior(prior, question, hits, weight, cite=cite)
    from lmstack.rag import query_lang

    return candidates(hits, lang or query_lang(question), cite=cite), None


# ---------------------------------------------------------------------------------------- answer-unit context
def unit_hits(reader: Reader, question: str, hits: Sequence[Any], n: int) -> list[Any]:
    """The prompt context of ``rag.context: units``: the ``n`` answer units of ``hits`` that ``reader`` (the
    no-model ranker) scores highest, best first, each as a :class:`lmstack.rag.Hit` whose chunk shows just that
    unit -- an FAQ entry whole (``Q: ... A: ...``, its question helps match a paraphrase), one fact sentence of a
    product, one sentence of a policy page. The fixed greeting and refusal are answers, not context.

    Shorter than whole passages (a product passage has six sentences), so the model reads ~30% fewer tokens per
    prompt, and ordered by the ranker, so the model starts from the ranker's choice and may overrule it."""
    import dataclasses

    from lmstack.rag import Hit

    by_id = {h.chunk.id: h.chunk for h in hits}
    out: list[Any] = []
    for c, score in reader.ranked("", question, hits):
        if c.rank == 0 or c.chunk_id not in by_id:
            continue
        src = by_id[c.chunk_id]
        text = src.text.strip() if c.chunk_id.startswith("faq/") else c.text
        out.append(Hit(dataclasses.replace(src, text=text), float(score), len(out) + 1))
        if len(out) == n:
            break
    return out


def ground_units(rec: dict[str, Any], reader: Reader, retriever: Any, n: int, system_prompt: str,
                 cite: bool = False) -> dict[str, Any]:
    """A chat or question row grounded by the rag stage (its ``context``: the passages' chunk ids), with the
    system message showing the top ``n`` answer units of those passages for its last question instead
    (:func:`unit_hits`). For a training chat (``facts``), the unit each answer states is shown even when the
    ranker put it below ``n`` (it replaces the last one), where the ranker put it otherwise: the model learns
    from the same ranked lists it will read. With ``cite``, answers end with the number of their unit."""
    import dataclasses

    from lmstack.apps.support.retrieval import CITATION, cite_passage, states
    from lmstack.rag import Hit, with_context

    msgs = [dict(m) for m in rec["messages"]]
    users = [m["content"] for m in msgs if m["role"] == "user"]
    passages = [Hit(c, 0.0, i + 1) for i, c in enumerate(filter(None, map(retriever.get, rec.get("context") or [])))]
    if not users or not passages:
        return {**rec, "messages": msgs, "units": []}
    ranked = unit_hits(reader, users[-1], passages, len(passages) * 16)
    shown = ranked[:n]
    answers = [CITATION.sub("", m["content"]) for m in msgs if m["role"] == "assistant"]
    for a in answers if rec.get("facts") else []:
        if cite_passage(a, shown) is not None:
            continue
        unit = next((h for h in ranked if states(h.chunk.text, a)), None)
        if unit is None:  # the fact's passage shows it in a form the units split differently: show the passage
            src = next((p for p in passages if states(p.chunk.text, a)), None)
            if src is None:
                continue
            unit = Hit(src.chunk, 0.0, 0)
        shown = shown[:n - 1] + [unit] if len(shown) >= n else shown + [unit]
    shown = [dataclasses.replace(h, rank=i) for i, h in enumerate(shown, 1)]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = with_context(system_prompt, shown)
    k = 0
    for m in msgs:
        if m["role"] != "assistant":
            continue
        a = answers[k]
        k += 1
        num = cite_passage(a, shown)
        m["content"] = f"{a} [{num}]" if cite and num is not None and rec.get("facts") else a
    return {**rec, "messages": msgs, "units": [h.chunk.text for h in shown],
            "context": [h.chunk.id for h in shown]}
