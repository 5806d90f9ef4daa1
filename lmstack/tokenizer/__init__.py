"""Tokenizer: byte-level BPE training, Hugging Face tokenizer directories, chat templates, loss masks.

    from lmstack.tokenizer import Tokenizer, train_tokenizer
    tok = train_tokenizer(["corpus/"], vocab_size=32000, out_dir="tok")
    tok = Tokenizer.from_dir("tok")                    # or any Llama 3 / Qwen2 / Mistral tokenizer dir
    enc = tok.render_chat(messages)                    # ChatEncoding(input_ids, loss_mask)

See docs/tokenizer.md.
"""

from lmstack.tokenizer.chat import ChatEncoding, assistant_loss_mask, render_template
from lmstack.tokenizer.pretokenize import DEFAULT_SPECIAL_TOKENS, SPLIT_PATTERN
from lmstack.tokenizer.stream import StreamDecoder
from lmstack.tokenizer.templates import CHATML_TEMPLATE
from lmstack.tokenizer.tokenizer import Tokenizer
from lmstack.tokenizer.train import train_tokenizer

__all__ = [
    "Tokenizer", "train_tokenizer", "ChatEncoding", "assistant_loss_mask", "render_template", "StreamDecoder",
    "CHATML_TEMPLATE", "DEFAULT_SPECIAL_TOKENS", "SPLIT_PATTERN",
]
