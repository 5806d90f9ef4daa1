"""The products app's recipe sections: the typed configs of its own stages (data, eval, bundle). Its base and
finetune sections are the library's (:mod:`lmstack.pipeline.stages`: ``BaseModelConfig``, ``FinetuneConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmstack.config import StrictModel


class DataStage(StrictModel):
    path: str | None = Field(None, description="the product dataset (JSONL: id, lang, split, attributes, prompt, "
                             "description); default: the shipped recipes/data/products/products.jsonl")
    langs: list[Literal["en", "zh"]] = Field(default_factory=lambda: ["en", "zh"], description="languages kept")
    train_repeat: int = Field(1, ge=1, le=20, description="copies of each training example")


class EvalStage(StrictModel):
    heldout_limit: int | None = Field(60, ge=1, description="held-out (test split) examples scored, balanced over "
                                      "languages; null: all")
    max_tokens: int = Field(96, ge=8, description="longest generated description, in tokens")
    compare_base: bool = Field(True, description="score the model before fine-tuning on the same products")
    speed_sequential: int = Field(8, ge=0, description="descriptions also generated one at a time, for the "
                                  "batched-vs-sequential throughput row (0: skip)")


class BundleStage(StrictModel):
    files: Literal["link", "copy"] = Field("link", description="link: hard links where the file system allows")
    max_tokens: int = Field(96, ge=8, description="longest description the bundled writer generates")
