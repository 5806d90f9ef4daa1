"""lmstack: the whole large-language-model workflow in one PyTorch package.

    import lmstack
    llm = lmstack.load("runs/quickstart/finetune/final")        # model + tokenizer on the serving engine
    print(llm.generate("Where is my order?", max_tokens=64)[0].outputs[0].text)
"""

from __future__ import annotations

from typing import Any

from lmstack._version import __version__


def load(path: str, **kwargs: Any):
    """Load a model directory (HF layout) with its tokenizer onto the generation engine.

    Keyword arguments go to :func:`lmstack.serve.llm.load` (adapter, device, dtype, max_num_seqs, ...).
    """
    from lmstack.serve.llm import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
