"""Pre-labels from a decoder prompted with the label set (``lmstack data label predict --prelabel llm``).

The model is constrained to the label choices by scoring them: for each label ``L`` the log-probability of the
answer ``L`` followed by the end-of-answer token after the prompt, ``log p(L | prompt) = Σ_t log p(l_t | prompt,
l_<t)``; the prediction is the most probable label and its score the normalized probability
``p(L) / Σ_L' p(L')`` (a softmax over the labels' sequence log-probabilities). This is the exact distribution
over the choices that guided-choice decoding (lmstack.serve.structured) samples from token by token; scoring every
choice also gives the second-best label, which uncertainty routing (:func:`lmstack.data.label.route`) needs.
The end token makes a label that is a prefix of another ("ref" / "refund") a complete answer of its own.

With a chat template the prompt is the user turn and the label the assistant's reply; without one the label
follows the prompt after a space (the "Label:" completion form).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from lmstack.errors import ConfigError, DataError

DEFAULT_PROMPT = ("Classify the text into exactly one of these labels: {labels}.\n\nText: {text}\n\n"
                  "Answer with the label only.")
MAX_TEXT_CHARS = 4000


def check_prompt(prompt: str, labels: Sequence[str]) -> None:
    if "{text}" not in prompt:
        raise ConfigError("--prompt must contain {text} (where the task's text goes); {labels} is optional")
    if len(labels) < 2 or len(set(labels)) != len(labels) or any(not x.strip() for x in labels):
        raise ConfigError(f"--labels: need at least two distinct, non-empty labels, got {list(labels)}")


@torch.no_grad()
def choice_logprobs(model, prefix: list[int], choices: Sequence[list[int]]) -> torch.Tensor:
    """(n_choices,) sum of the log-probabilities of each choice's tokens after ``prefix`` (one padded batch)."""
    seqs = [prefix + c for c in choices]
    width = max(map(len, seqs))
    x = torch.zeros(len(seqs), width, dtype=torch.long)                    # (C, L), right-padded
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    logp = torch.log_softmax(model(x).float(), dim=-1)                     # (C, L, V)
    out = torch.empty(len(choices), dtype=torch.float64)
    p = len(prefix)
    for i, c in enumerate(choices):
        pos = torch.arange(p - 1, p - 1 + len(c))                          # positions that predict the choice
        out[i] = logp[i, pos, torch.tensor(c)].double().sum()
    return out


class LLMLabeler:
    """A decoder + tokenizer that turn a text into a distribution over ``labels``."""

    def __init__(self, model_dir: str | Path, labels: Sequence[str], prompt: str = DEFAULT_PROMPT) -> None:
        from lmstack.model import load_model
        from lmstack.tokenizer import Tokenizer

        check_prompt(prompt, labels)
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"--model {model_dir}: not a model directory (no config.json)")
        self.model = load_model(model_dir, device="cpu", dtype="fp32").eval()
        self.tok = Tokenizer.from_dir(model_dir)
        self.labels, self.prompt = list(labels), prompt
        self.chat = self.tok.chat_template is not None
        end = self.tok.eos_token_id
        if end is None:
            raise DataError(f"{model_dir}: the tokenizer has no eos token to end a label with")
        lead = "" if self.chat else " "
        self.choices = [self.tok.encode(lead + lab) + [end] for lab in self.labels]
        self.max_len = int(self.model.config.max_position_embeddings)

    def prefix(self, text: str) -> list[int]:
        body = self.prompt.replace("{labels}", ", ".join(self.labels)).replace("{text}", text[:MAX_TEXT_CHARS])
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                                tokenize=True, sanitize=True)
        return self.tok.encode(body)

    def probabilities(self, text: str) -> dict[str, float]:
        ids = self.prefix(text)
        room = self.max_len - max(map(len, self.choices))
        if len(ids) > room:
            raise DataError(f"prompt of {len(ids)} tokens does not fit the model's {self.max_len} positions; "
                            "shorten --prompt or the texts")
        p = torch.softmax(choice_logprobs(self.model, ids, self.choices), dim=0)
        return {lab: float(x) for lab, x in zip(self.labels, p)}


def prelabel_llm(records: list[dict[str, Any]], model_dir: str | Path, labels: Sequence[str],
                 prompt: str = DEFAULT_PROMPT, text_field: str = "text", model_name: str | None = None
                 ) -> list[dict[str, Any]]:
    """Add an LLM prediction (label, score) and ``label_probs`` / ``uncertainty`` to every record."""
    from lmstack.data.label import add_prediction, text_of

    lab = LLMLabeler(model_dir, labels, prompt)
    name = model_name or f"llm:{Path(model_dir).name}"
    for rec in records:
        add_prediction(rec, name, lab.probabilities(text_of(rec, text_field)))
    return records
