"""Apps plug their stages into the runner: an :class:`App` is a name, its typed stages in their canonical order,
the checks across them, and its parts of the summary and the report.

The runner imports no app. An app registers itself (:func:`register_app`) when its module is imported, and
installed apps are found by name through the ``lmstack.apps`` entry-point group (``pyproject.toml``:
``[project.entry-points."lmstack.apps"] support = "lmstack.apps.support.pipeline:APP"``), the way pytest and
Airflow find plugins, so a third-party package adds an app without touching lmstack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

from lmstack.errors import ConfigError
from lmstack.pipeline.recipe import Recipe
from lmstack.pipeline.runner import PipelineResult, Stage

GROUP = "lmstack.apps"


@dataclass
class App:
    name: str
    stages: list[Stage]  # in the order a recipe must list them
    description: str = ""
    check: Callable[[Recipe], None] = lambda r: None  # cross-stage rules (raise ValueError / ConfigError)
    summary: Callable[[PipelineResult, Any], None] = lambda res, console: None  # extra terminal tables
    report: Callable[[PipelineResult], list[str]] = lambda res: []  # HTML sections after the stage table
    next_commands: Callable[[PipelineResult], list[str]] = lambda res: []  # what to run on the result
    # other orders a recipe may list the stages in (each names every stage), e.g. a stage that may run before or
    # after another depending on its config; ``check`` says which one a config needs
    alt_orders: tuple[tuple[str, ...], ...] = ()
    registry: dict[str, Stage] = field(init=False)

    def __post_init__(self) -> None:
        self.registry = {s.name: s for s in self.stages}

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.registry)

    def validate(self, recipe: Recipe) -> None:
        """The app's stage order and its cross-stage rules, as one-line ConfigErrors (after
        :func:`~lmstack.pipeline.runner.configure` has checked the stage names and sections)."""
        where = recipe.source or "recipe"  # unknown stages: lmstack.pipeline.runner.configure, which runs first
        if all([s for s in order if s in recipe.stages] != list(recipe.stages) for order in (self.order, *self.alt_orders)):
            alts = "".join(f" or {list(o)}" for o in self.alt_orders)
            raise ConfigError(f"{where}: stages must follow the order {list(self.order)}{alts}; got {recipe.stages}")
        try:
            self.check(recipe)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


_APPS: dict[str, App] = {}


def register_app(app: App) -> App:
    _APPS[app.name] = app
    return app


def get_app(name: str) -> App:
    """A registered app, else the installed one of that name (entry point group ``lmstack.apps``), else -- for a
    source tree run without ``pip install`` -- the ``APP`` of module ``lmstack.apps.NAME.pipeline`` (what the entry point names)."""
    import importlib
    import re

    if name in _APPS:
        return _APPS[name]
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            return register_app(ep.load())
    if re.fullmatch(r"[a-z][a-z0-9_]*", name):
        try:
            module = importlib.import_module(f"{GROUP}.{name}.pipeline")
        except ModuleNotFoundError as e:
            if e.name not in (f"{GROUP}.{name}", f"{GROUP}.{name}.pipeline"):
                raise
        else:
            if isinstance(getattr(module, "APP", None), App):  # the entry point's object, by the naming rule
                return register_app(module.APP)
    known = sorted(set(_APPS) | {ep.name for ep in entry_points(group=GROUP)})
    raise ConfigError(f"app {name!r} is not installed; installed apps: {', '.join(known) or 'none'}")
