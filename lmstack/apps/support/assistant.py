"""The Larkspur Home support assistant: a fine-tuned model on the generation engine, with the system prompt
it was trained under and a bounded conversation history.

    from lmstack.apps.support.assistant import SupportAssistant
    bot = SupportAssistant("runs/quickstart/finetune/final")
    bot.ask("How long does standard shipping take?")     # -> "Standard shipping takes 3-5 business days ..."
    bot.ask("And express?")                               # the history is kept; bot.reset() clears it

Built only from public pieces: :func:`lmstack.serve.llm.load` (model, tokenizer, engine; adapters) and the
tokenizer's chat template. Retrieval (RAG) and guardrails plug in here when those stages land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.apps.support.dialogues import SYSTEM_PROMPT


class SupportAssistant:
    def __init__(self, model: str | Path | Any, adapter: str | Path | None = None, *,
                 system_prompt: str = SYSTEM_PROMPT, max_history_turns: int = 4, max_tokens: int = 96,
                 temperature: float = 0.0, **load_kw: Any):
        if isinstance(model, (str, Path)):
            from lmstack.serve.llm import load

            self.llm = load(model, adapter=adapter, **load_kw)
        else:  # an already loaded lmstack LLM
            self.llm = model
        self.system_prompt = system_prompt
        self.max_history_turns = max_history_turns
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature}
        self.history: list[dict[str, str]] = []

    def messages(self, question: str) -> list[dict[str, str]]:
        """System prompt + the last ``max_history_turns`` exchanges + the new question."""
        keep = self.history[-2 * self.max_history_turns:] if self.max_history_turns else []
        return [{"role": "system", "content": self.system_prompt}, *keep, {"role": "user", "content": question}]

    def ask(self, question: str, **sampling: Any) -> str:
        question = question.strip()
        if not question:
            return ""
        out = self.llm.chat(self.messages(question), **{**self.sampling, **sampling})
        answer = out.outputs[0].text.strip()
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history.clear()
