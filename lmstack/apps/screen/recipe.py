"""The screen app's recipe sections (``recipes/screen.yaml``): data, classifier, eval, bundle; the base LLM is
the library's ``base`` stage (a GGUF import)."""

from __future__ import annotations

from pydantic import Field

from lmstack.config import StrictModel


class DataStage(StrictModel):
    path: str | None = Field(None, description="screen items (JSON Lines; default: the shipped "
                             "lmstack/apps/screen/data/transactions.jsonl); each record has text, label, split")


class ClassifierStage(StrictModel):
    epochs: int = Field(4, ge=1, le=200)
    hidden_size: int = Field(128, ge=16)
    num_hidden_layers: int = Field(2, ge=1)
    vocab_size: int = Field(1000, ge=300)
    max_length: int = Field(128, ge=16, le=512)
    lr: float = Field(1e-3, gt=0)
    threads: int = Field(1, ge=1, description="torch.set_num_threads while training (1: a tiny model's steps are "
                         "faster on one thread than two on a shared machine)")


class EvalStage(StrictModel):
    target_fpr: float = Field(0.05, gt=0, lt=1, description="false-positive rate the threshold is chosen for, on dev")
    band_share: float = Field(0.15, ge=0, le=1, description="share of dev items the LLM band holds around the threshold")
    int8: bool = Field(True, description="the classifier's linears as int8 (lmstack.quant), as served")
    llm: bool = Field(True, description="run the LLM stage (off: the band falls back to the threshold)")
    llm_only_limit: int = Field(120, ge=0, description="test items the LLM-only baseline judges (it is slow)")
    latency_items: int = Field(24, ge=0, description="test items timed one at a time (batch 1) per system")
    max_tokens: int = Field(48, ge=8, le=256, description="tokens for a verdict (a cut one falls back)")
    threads: int = Field(2, ge=1, description="torch.set_num_threads for the timings")


class BundleStage(StrictModel):
    files: str = Field("link", pattern="^(link|copy)$")
