"""The recipe: one YAML file that names an app, the stages to run in order, and configures each.

    name: quickstart                 # runs/quickstart/
    app: support                     # the app whose stages these are (lmstack/apps/support)
    stages: [data, rag, tokenizer, pretrain, finetune, reader, eval, bundle]
    seed: 0                          # with device and dtype: defaults for every stage's train: section
    pretrain: {model: {preset: micro}, train: {steps: 800}}     # a lmstack.train.PretrainConfig
    finetune: {method: full, train: {steps: 500}}               # a lmstack.tune.FinetuneConfig
    ...

Each stage section is the typed config of that stage (the library's own: ``PretrainConfig``,
``FinetuneConfig``, or the app's), read by the one rule of :func:`lmstack.config.stage_section`, with the
paths the pipeline connects (upstream outputs, the base model) filled in by the stage's ``wire``. Every
section is validated before any stage runs (:func:`lmstack.pipeline.runner.configure`). A recipe with
``stages: []`` is a stage-only config file for ``lmstack pretrain|finetune|align dpo|distill -c``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from lmstack.config import StrictModel, apply_overrides, read_yaml, validate

COMMON = ("name", "description", "run_dir", "seed", "device", "dtype", "app", "stages", "model", "source")


class Recipe(StrictModel):
    """The recipe-level fields; every other top-level key is a stage section (``sections``)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    run_dir: str | None = Field(None, description="default: runs/NAME")
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    app: str | None = Field(None, description="the app whose stages the recipe runs (lmstack/apps/NAME)")
    stages: list[str] = Field(default_factory=list)
    model: str | None = Field(None, description="an existing Hugging Face model directory to fine-tune "
                              "(instead of a pretrain stage)")
    source: str | None = Field(None, description="filled in: the recipe file")

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        if self.stages and self.app is None:
            raise ValueError("a recipe with stages names its app (app: support); see docs/design.md")
        for k, v in self.sections.items():
            if not isinstance(v, dict):
                raise ValueError(f"section {k!r} must be a mapping, got {type(v).__name__}")
        return self

    @property
    def sections(self) -> dict[str, Any]:
        """The stage sections, as written (``{"pretrain": {...}, ...}``)."""
        return dict(self.__pydantic_extra__ or {})

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name) or {})

    def document(self) -> dict[str, Any]:
        """The recipe as a YAML document (what :func:`lmstack.config.stage_section` reads)."""
        return self.model_dump(mode="json", exclude={"source"})

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply ``section.key=value`` overrides, validate the recipe-level fields (ConfigError
    names the field). Stage sections are validated against their stages' configs by the runner."""
    data = read_yaml(path)
    apply_overrides(data, overrides)
    recipe = validate(Recipe, data, str(path))
    recipe.source = str(path)
    if recipe.model is not None:
        p = Path(recipe.model).expanduser()
        if not p.is_absolute() and not p.exists() and (Path(path).parent / p).exists():
            p = Path(path).parent / p  # relative to the recipe file
        recipe.model = str(p)
    return recipe
