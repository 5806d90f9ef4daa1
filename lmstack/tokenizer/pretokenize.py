"""The byte-level BPE pipeline lmstack trains: split pattern, special tokens, normalizer/decoder choice.

References:
- GPT-2 byte-level BPE (Radford et al. 2019): every byte is a base symbol, so any string round-trips.
- GPT-4's ``cl100k_base`` split regex (tiktoken): contractions, letter runs with one optional leading
  non-letter, digits in groups of 1-3, punctuation runs, and whitespace that leaves one space for the next word.

lmstack's pattern is cl100k's with two changes:
1. CJK (Han, Hiragana, Katakana, Hangul, CJK punctuation is left to the punctuation rule) is split out of the
   letter class: a pre-token never mixes CJK and Latin (``"GPU加速"`` -> ``"GPU"``, ``"加速"``), and each CJK
   run is its own pre-token (with an optional leading space). Merges therefore never cross the script boundary.
2. Combining marks (``\\p{M}``) count as letters, so Devanagari/Thai/Arabic words with marks are not shredded
   (as in tiktoken's ``o200k_base``).

No normalizer runs: ``decode(encode(x)) == x`` for every string, control characters included.
"""

from __future__ import annotations

# Scripts written without spaces between words. Kept out of the Latin-style letter class.
CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\x{3005}\x{30FC}"

# Onig regex (the engine inside Hugging Face `tokenizers`). `&&[^...]` is class intersection.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions
    r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}&&[^" + CJK + r"]]+"  # a word (non-CJK letters), one optional leading symbol/space
    r"| ?[" + CJK + r"]+"  # a CJK run, optional leading space
    r"|\p{N}{1,3}"  # digits in groups of 1-3
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation / symbols (emoji), optional leading space, trailing newlines
    r"|\s+\z"  # whitespace that ends the text stays one piece (tiktoken's current cl100k `\s++$`)
    r"|\s*[\r\n]+"  # newlines with their leading whitespace
    r"|\s+(?!\S)"  # whitespace run, leaving the last space for the next word
    r"|\s+"  # trailing whitespace
)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
N_RESERVED = 8
RESERVED = [f"<|reserved_{i}|>" for i in range(N_RESERVED)]

# Order fixes the ids: <|endoftext|>=0, <|pad|>=1, <|im_start|>=2, <|im_end|>=3, reserved 4..11.
DEFAULT_SPECIAL_TOKENS: list[str] = [EOS, PAD, IM_START, IM_END, *RESERVED]

# Markers that end an assistant turn in common chat formats; a tokenizer that has one of these as an added
# token treats it as an extra end-of-generation id (ChatML, Llama 3, Phi-3, Gemma, ...).
KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")


def build_bpe_tokenizer(special_tokens: list[str], split_digits: bool = False):
    """An untrained ``tokenizers.Tokenizer``: BPE model, lmstack split + byte-level pre-tokenizer, byte decoder.

    ``split_digits``: every digit is its own pre-token (so its own token), as Llama and DeepSeek do, instead of
    cl100k's groups of 1-3 -- column arithmetic stays learnable for a small model (the RL arithmetic demo)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pattern = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}") if split_digits else SPLIT_PATTERN
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # ByteLevel post-processor only maps offsets back to characters; it adds no tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok
