"""``DataPipelineConfig``: the typed config of ``lmstack data run`` (YAML + dotted overrides).

Every step has ``enabled`` and its own knobs; defaults work on a laptop. See docs/data.md for a full example.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmstack.config import StrictModel
from lmstack.text.pii import check_kinds
from lmstack.text.quality import QualityConfig


class InputConfig(StrictModel):
    path: str                                   # file, directory or glob ("data/**/*.jsonl.gz")
    name: str | None = None                     # source name for provenance and mixing (default: file stem)
    text_field: str = "text"                    # jsonl/json/csv/parquet field ("a.b" for nested JSON)
    txt_mode: Literal["file", "paragraph", "line"] = "file"  # .txt/.md: one doc per file / blank-line block / line
    keep_fields: list[str] = []                 # extra fields copied into the output "meta"
    weight: float = Field(1.0, ge=0.0)          # mixing weight


class NormalizeConfig(StrictModel):
    enabled: bool = True
    nfkc: bool = True
    keep_cjk_punct: bool = True                 # NFKC leaves full-width punctuation (，！？：；) alone
    control: bool = True
    whitespace: bool = True
    html: Literal["auto", "always", "never"] = "auto"   # .html inputs are always converted
    mojibake: bool = True


class LanguageConfig(StrictModel):
    enabled: bool = True
    keep: list[Literal["zh", "en", "other"]] = ["en", "zh"]
    min_score: float = Field(0.0, ge=0.0, le=1.0)


class BlocklistConfig(StrictModel):
    enabled: bool = False
    builtin: list[Literal["en", "zh"]] = []     # lmstack/data/blocklists/{en,zh}.txt: short spam/adult/gambling lists
    words: list[str] = []                       # English words match whole words (case-insensitive); Chinese: substrings
    files: list[str] = []                       # one word per line, '#' comments
    max_hits: int = Field(0, ge=0)              # drop a document with more than this many hits


class PIIConfig(StrictModel):
    enabled: bool = True
    kinds: list[str] | None = None              # default: all of EMAIL PHONE IP CREDIT_CARD CN_ID IBAN
    action: Literal["redact", "drop", "count"] = "redact"

    @field_validator("kinds")
    @classmethod
    def _known(cls, v):
        return check_kinds(v)


class DedupConfig(StrictModel):
    exact: bool = True                          # drop documents whose normalized text repeats an earlier one
    near: bool = True                           # MinHash LSH near-duplicate removal
    threshold: float = Field(0.8, gt=0.0, lt=1.0)  # Jaccard similarity of shingle sets
    num_perm: int = Field(128, ge=16, le=1024)
    ngram: int = Field(5, ge=1)                 # word n-gram shingles for spaced languages
    cjk_ngram: int = Field(5, ge=1)             # character n-gram shingles for CJK text
    seed: int = 1


class MixConfig(StrictModel):
    enabled: bool = False
    budget_documents: int | None = Field(None, ge=1)
    budget_tokens: int | None = Field(None, ge=1)   # estimated as characters / chars_per_token
    chars_per_token: float = Field(4.0, gt=0.0)     # rough: ~4 for English, ~1.5 for Chinese with BPE
    allow_upsample: bool = True                     # repeat a small source when its share exceeds its size
    seed: int = 0

    @model_validator(mode="after")
    def _one_budget(self):
        if self.enabled and (self.budget_documents is None) == (self.budget_tokens is None):
            raise ValueError("mixing needs exactly one of budget_documents or budget_tokens")
        return self


class TokenizeConfig(StrictModel):
    enabled: bool = False
    tokenizer: str | None = None                # tokenizer directory (tokenizer.json)
    out_dir: str | None = None                  # default: <out_dir>/tokens
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    val_documents: int | None = Field(None, ge=0)
    shard_tokens: int = Field(100_000_000, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _needs_tok(self):
        if self.enabled and not self.tokenizer:
            raise ValueError("tokenize.enabled needs tokenize.tokenizer (a tokenizer directory)")
        return self


class DataPipelineConfig(StrictModel):
    inputs: list[InputConfig]
    out_dir: str | None = None                  # may be given on the command line / to run_pipeline instead
    workers: int = Field(0, ge=0)               # processes; 0 = every core
    batch_size: int = Field(256, ge=1)          # documents per worker task
    examples: int = Field(3, ge=0)              # examples kept per removal reason in the report
    strict: bool = False                        # an unreadable file or directory stops the run (else: counted)
    max_record_bytes: int = Field(8 << 20, ge=1024)  # larger documents are skipped as record_too_large
    normalize: NormalizeConfig = NormalizeConfig()
    language: LanguageConfig = LanguageConfig()
    quality: QualityConfig = QualityConfig()
    blocklist: BlocklistConfig = BlocklistConfig()
    pii: PIIConfig = PIIConfig()
    dedup: DedupConfig = DedupConfig()
    mix: MixConfig = MixConfig()
    tokenize: TokenizeConfig = TokenizeConfig()

    @field_validator("inputs")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("at least one input is needed")
        return v
