"""The Larkspur Home support assistant: retrieve -> prompt -> model, with the system prompt it was trained
under and a bounded conversation history.

    from lmstack.apps.support.assistant import SupportAssistant
    bot = SupportAssistant("runs/quickstart/finetune/final", index="runs/quickstart/rag/index.sqlite")
    bot.ask("How long does standard shipping take?")     # -> "Standard shipping takes 3-5 business days ..."
    bot.last_context                                      # the knowledge-base passages that answer used
    # the answer is the passage sentence the ranker scores highest (mode="select"; "generate": free text);
    # ranker="runs/quickstart/reader/ranker.json" uses the weights the recipe fit (default: likelihood alone)
    bot.ask("And express?")                               # the history is kept; bot.reset() clears it

With ``index`` (a retrieval index written by the recipe's ``rag`` stage, or an open
:class:`lmstack.rag.Retriever`) every turn retrieves the top ``k`` passages for the question (and the best
one for the previous question) and puts them into the system message, exactly as the fine-tuning chats and
the evaluation were built (:func:`lmstack.apps.support.retrieval.context_hits`). Without an index it asks
the model with the bare system prompt (a model tuned without retrieval).

Built only from public pieces: :func:`lmstack.serve.llm.load` (model, tokenizer, engine; adapters), the
tokenizer's chat template and :mod:`lmstack.rag`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from lmstack.apps.support.dialogues import SYSTEM_PROMPT
from lmstack.apps.support.retrieval import DEFAULT_K, citation_numbers, context_hits, guard_hits


class SupportAssistant:
    """``mode``: "select" (with an index, the default: the knowledge-base sentence a ranker scores highest,
    :mod:`lmstack.apps.support.reader`; ``ranker`` is the reader stage's ``ranker.json``) or "generate" (free
    generation from the grounded prompt)."""

    def __init__(self, model: str | Path | Any, adapter: str | Path | None = None, *,
                 index: str | Path | Any = None, k: int = DEFAULT_K, context_max_chars: int | None = None,
                 mode: str = "select", reader: Any = None, ranker: str | Path | Any = None,
                 system_prompt: str = SYSTEM_PROMPT, max_history_turns: int = 4, max_tokens: int = 96,
                 temperature: float = 0.0, guard: str | Path | Any = None, context: str = "passages",
                 units: int = 4, copy_bias: float = 0.0, copy_start_bias: float = 0.0, copy_prior: float = 0.0,
                 cite: bool = False, **load_kw: Any):
        if mode not in ("select", "generate"):
            raise ValueError(f"mode must be 'select' or 'generate', got {mode!r}")
        if context not in ("passages", "units"):
            raise ValueError(f"context must be 'passages' or 'units', got {context!r}")
        if isinstance(guard, (str, Path)):
            from lmstack.guard import Guard

            guard = Guard.from_policy(guard)  # a bad policy fails before the model loads
        self.guard = guard  # lmstack.guard.Guard: input rails, sanitized passages, output rails (None: off)
        if isinstance(index, (str, Path)):
            from lmstack.apps.support.retrieval import open_kb_retriever

            index = open_kb_retriever(index)
        self.retriever = index
        self.k, self.context_max_chars = k, context_max_chars
        # context "units": the prompt shows the top `units` answer units of the passages, ranked without the model
        self.unit_reader, self.units = (unit_reader(ranker) if context == "units" and index is not None else None), units
        self.mode = mode if index is not None else "generate"
        if isinstance(model, (str, Path)):
            from lmstack.serve.llm import load

            self.llm = load(model, adapter=adapter, **load_kw)
            if self.mode == "select" and reader is None:
                from lmstack.apps.support.reader import Reader

                reader = Reader.load(model, adapter=adapter, device=load_kw.get("device"), ranker=ranker, llm=self.llm)
        else:  # an already loaded lmstack LLM
            self.llm = model
        self.reader = reader
        if self.mode == "select" and reader is None:
            raise ValueError("mode='select' needs a reader (lmstack.apps.support.reader.Reader) for a loaded model")
        self.system_prompt = system_prompt
        self.max_history_turns = max_history_turns
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature}
        # grounded decoding: quoting the shown passages' answer units (and the shop's fixed replies) is made cheaper
        # than paraphrasing them (lmstack.serve.logits.CopyBias); 0 and 0: plain decoding
        self.copy_bias, self.copy_start_bias = copy_bias, copy_start_bias
        # reader-guided decoding: each quotable text also gets copy_prior x its log-probability under the no-model
        # ranker (lmstack.apps.support.reader.quote_prior); 0: every text alike
        self.copy_prior = copy_prior
        self.cite = cite  # the model was tuned to cite (" [2]"): a quote runs on into its passage's marker
        # (the units' reader when there is one: one ranker and one sentence embedder loaded, not two)
        self.prior_reader = (self.unit_reader or unit_reader(ranker)) if copy_prior and index is not None else None
        self.history: list[dict[str, str]] = []
        self.last_context: list[Any] = []  # lmstack.rag.Hit of the last question

    @classmethod
    def load(cls, bundle: str | Path, **overrides: Any) -> "SupportAssistant":
        """The assistant a recipe built, from its bundle directory alone (model, adapter, index, ranker, k,
        system prompt, mode: :mod:`lmstack.apps.bundle`). ``overrides``: constructor arguments that win
        (``device``, ``max_num_seqs``, ``mode`` ...)."""
        return cls(**{**bundle_kwargs(bundle), **overrides})

    def retrieve(self, question: str) -> list[Any]:
        """The passages a turn is answered from (empty without an index); with a guard, instructions found
        inside them are cut out first (indirect prompt injection)."""
        if self.retriever is None:
            return []
        previous = [m["content"] for m in self.history if m["role"] == "user"]
        hits = guard_hits(context_hits(self.retriever, question, previous[-1:], k=self.k), self.guard)
        if self.unit_reader is not None:
            from lmstack.apps.support.reader import unit_hits

            hits = unit_hits(self.unit_reader, question, hits, self.units)
        return hits

    def messages(self, question: str) -> list[dict[str, str]]:
        """System prompt (+ retrieved passages) + the last ``max_history_turns`` exchanges + the new question."""
        from lmstack.rag import with_context

        keep = self.history[-2 * self.max_history_turns:] if self.max_history_turns else []
        self.last_context = self.retrieve(question)
        system = with_context(self.system_prompt, self.last_context, self.context_max_chars)
        return [{"role": "system", "content": system}, *keep, {"role": "user", "content": question}]

    def ask(self, question: str, **sampling: Any) -> str:
        """The answer to ``question`` (with its citation, ``... 3-5 business days. [1]``, when the model was
        tuned to cite; :meth:`cited` says which passages that is)."""
        return "".join(self.stream(question, **sampling)).strip()

    def stream(self, question: str, **sampling: Any) -> Iterator[str]:
        """The answer as text pieces while it is generated (mode generate; a selected answer comes in one
        piece). The history gets the whole answer once the stream ends."""
        question = question.strip()
        if not question:
            return
        if self.guard is not None:  # input rails: a blocked question gets the policy's message, never the model
            verdict = self.guard.check_input(question)
            if verdict.blocked:
                self.last_context = []
                yield verdict.message or verdict.text
                return
            question = verdict.text  # PII redacted
        msgs = self.messages(question)
        if self.mode == "select":
            prompt = self.llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            pieces: Iterator[str] = iter([self.reader.answer(prompt, question, self.last_context)])
        else:
            pieces = self.llm.stream(self.llm.chat_prompt(msgs), **{**self.sampling, **self.copy(question), **sampling})
        answer = []
        for piece in self._guarded(pieces):
            if not answer:
                piece = piece.lstrip()
            if piece:
                answer.append(piece)
                yield piece
        text = "".join(answer).strip()
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]

    def _guarded(self, pieces: Iterator[str]) -> Iterator[str]:
        """``pieces`` through the output rails window by window (lmstack.guard.serving.guard_stream): text is
        released as it clears; a blocked answer ends with the policy's message and stops the generation."""
        if self.guard is None:
            yield from pieces
            return
        from lmstack.guard.serving import guard_stream

        for text, verdict in guard_stream(self.guard, pieces, [h.chunk.text for h in self.last_context]):
            if verdict is not None and verdict.blocked:
                yield verdict.message or ""
                if hasattr(pieces, "close"):
                    pieces.close()  # the engine frees the sequence
                return
            if text:
                yield text

    def copy(self, question: str) -> dict[str, Any]:
        """The grounded-decoding sampling argument for this turn (empty when off): the answer units of the
        passages just retrieved and the fixed replies in the question's language."""
        if not (self.copy_bias or self.copy_start_bias):
            return {}
        from lmstack.apps.support.reader import quote_texts
        from lmstack.serve.types import CopyFrom

        texts, weights = quote_texts(self.last_context, question, prior=self.prior_reader, weight=self.copy_prior,
                                     cite=self.cite)
        return {"copy": CopyFrom(tuple(texts), bias=self.copy_bias, start_bias=self.copy_start_bias,
                                 weights=None if weights is None else tuple(weights))}

    def cited(self, answer: str) -> list[Any]:
        """The passages (:class:`lmstack.rag.Hit` of the last question) an answer cites with ``[n]`` markers."""
        return [self.last_context[n - 1] for n in citation_numbers(answer) if 0 < n <= len(self.last_context)]

    def reset(self) -> None:
        self.history.clear()
        self.last_context = []


def bundle_kwargs(bundle: str | Path) -> dict[str, Any]:
    """:class:`SupportAssistant` arguments from a support bundle (what ``lmstack support chat|serve BUNDLE`` use)."""
    from lmstack.apps.bundle import read_bundle

    b = read_bundle(bundle, app="support")
    s = b.settings
    out: dict[str, Any] = {"model": str(b.part("model")), "adapter": b.part("adapter"), "index": str(b.part("index")),
                           "ranker": b.part("ranker"), "guard": b.part("guard")}
    for key in ("k", "context_max_chars", "mode", "system_prompt", "max_tokens", "context", "units", "copy_bias",
                "copy_start_bias", "copy_prior", "cite"):
        if s.get(key) is not None:
            out[key] = s[key]
    return out


def unit_reader(ranker: str | Path | Any) -> Any:
    """The no-model reader that orders answer units for ``context: "units"`` and weighs them for reader-guided
    decoding (the reader stage's ``no_model.json``: retrieval rank, overlap and embeddings, no likelihood -- the
    units are ranked before the model reads them)."""
    from lmstack.apps.support.reader import Reader
    from lmstack.rag.rerank import LinearRanker

    if ranker is None:
        raise ValueError("context 'units' and copy_prior need the ranker that orders the answer units (the reader "
                         "stage's no_model.json)")
    if isinstance(ranker, (str, Path)):
        ranker = LinearRanker.load(ranker)
    if ranker.uses("lm"):
        raise ValueError("context 'units' and copy_prior rank answer units without the model; this ranker weighs "
                         "the model's likelihood: use the reader stage's no_model.json")
    return Reader.load(None, ranker=ranker)
