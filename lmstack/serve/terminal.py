"""Terminal front ends on the engine: stream one completion, or a multi-turn chat (``lmstack generate`` /
``lmstack chat``). I/O is passed in (``read`` / ``write``) so both are testable without a terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmstack.serve.llm import LLM
from lmstack.serve.types import RequestOutput

CHAT_HELP = "commands: /reset clears the conversation, /exit quits"


def stream_completion(llm: LLM, prompt: str | list[int], write: Callable[[str], Any], **sampling: Any) -> RequestOutput:
    """Write text deltas of one completion as they are produced; returns the final RequestOutput."""
    last = None
    for out in llm.stream_outputs(prompt, **sampling):
        if out.outputs[0].delta_text:
            write(out.outputs[0].delta_text)
        last = out
    return last


def chat_loop(llm: LLM, read: Callable[[str], str], write: Callable[[str], Any], system: str | None = None,
              **sampling: Any) -> list[dict[str, str]]:
    """Read user turns until ``/exit`` or end of input; stream each reply through the chat template.

    ``/reset`` starts a new conversation (keeping ``system``). Returns the final conversation."""
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    llm.chat_prompt(messages + [{"role": "user", "content": "hi"}])  # fail early without a chat template
    write(f"{CHAT_HELP}\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        cmd = line.strip()
        if cmd == "/exit":
            break
        if cmd == "/reset":
            messages = list(base)
            write("(conversation cleared)\n")
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        reply = stream_completion(llm, llm.chat_prompt(messages), write, **sampling)
        write("\n")
        messages.append({"role": "assistant", "content": reply.outputs[0].text})
    return messages
