"""The pipeline runner: stages in order, each skipped when its inputs and config are unchanged.

Make/DVC's idea at recipe scale. Every stage has a *fingerprint*: the sha256 of its config section, the
recipe seed, the lmstack version, the content hashes of its external inputs (the shop files, a user's model
directory) and the fingerprints of the stages it reads. The state of stage S lives in
``runs/NAME/state/S.json``::

    {"status": "running" | "done", "fingerprint": "...", "started": ..., "seconds": ..., "summary": {...}}

- done + same fingerprint + outputs present  -> skipped (its summary is reused);
- running + same fingerprint (an interrupted run) -> rerun with ``ctx.resume = True`` (pretraining and
  fine-tuning continue from their newest checkpoint; other stages write atomically and simply redo);
- anything else -> the stage directory is cleared and the stage runs from scratch.

The done marker is written atomically after the stage's outputs, so a killed run never looks finished.
The runner knows no app: an :class:`App` (``lmstack/apps/NAME``) hands it typed :class:`Stage` objects.
``from_stage`` forces that stage and every later one to rerun; ``only`` runs one stage (its upstream
stages must be done). One rich progress display covers the stages; the libraries' own bars nest under it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmstack._version import __version__
from lmstack.config import save_config, stage_section, validate
from lmstack.errors import ConfigError, LmstackError, Terminated
from lmstack.pipeline.recipe import Recipe
from lmstack.utils.io import atomic_write_json
from lmstack.utils.progress import progress


class StageInterrupted(LmstackError):
    """A stage stopped early (Ctrl-C / SIGTERM) after saving what it could; rerun to resume."""

    exit_code = 130


@dataclass
class StageContext:
    recipe: Recipe
    name: str
    run_dir: Path
    config: Any = None  # the stage's validated config (its ``Stage.config`` type), None for a stage without one
    resume: bool = False
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # upstream stage -> summary
    console: Any = None

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.name

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(f"  [dim]{self.name}:[/dim] {msg}")


@dataclass
class Stage:
    """One step of a recipe. ``config`` is the pydantic type of its recipe section (the library's own config,
    e.g. ``PretrainConfig``, or the app's); ``wire`` gives the values the pipeline connects (upstream outputs,
    the base model), which fill what the section leaves unset (:func:`lmstack.config.stage_section`)."""

    name: str
    run: Callable[[StageContext], dict[str, Any]]  # does the work (ctx.config), returns a JSON-able summary
    config: type | None = None  # the section's typed config
    wire: Callable[[Recipe], dict[str, Any]] = lambda r: {}  # connected values, filled where the section is silent
    deps: Callable[[Recipe], list[str]] = lambda r: []  # stages (in this recipe) whose outputs it reads
    depends: Callable[[Recipe], Any] = lambda r: None  # more of the recipe it depends on (JSON-able)
    inputs: Callable[[Recipe], dict[str, str]] = lambda r: {}  # external inputs -> content hash
    outputs: Callable[[StageContext], list[Path]] = lambda ctx: []  # must exist for a skip
    row: Callable[[dict[str, Any]], str] | None = None  # the summary as one line of the stage table
    description: str = ""

    def configure(self, recipe: Recipe) -> Any:
        """The stage's validated config from the recipe (ConfigError names the file, section and field)."""
        if self.config is None:
            return None
        data = stage_section(recipe.document(), self.name, self.wire(recipe), recipe.source or "recipe")
        written = recipe.section(self.name)
        for key in ("run_dir", "train"):  # the rule's defaults apply to the stages that have these fields
            if key not in self.config.model_fields and key not in written:
                data.pop(key, None)
        return validate(self.config, data, recipe.source or "recipe", prefix=self.name)


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "resumed" | "skipped"
    seconds: float
    summary: dict[str, Any]
    fingerprint: str


@dataclass
class PipelineResult:
    recipe: Recipe
    run_dir: Path
    stages: list[StageResult]
    seconds: float

    def summary(self, name: str) -> dict[str, Any]:
        for s in self.stages:
            if s.name == name:
                return s.summary
        return {}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def configure(recipe: Recipe, registry: dict[str, Stage]) -> dict[str, Any]:
    """Validate every stage section of the recipe before any stage runs: ``{stage: config object}``."""
    unknown = [s for s in recipe.stages if s not in registry]
    if unknown:
        raise ConfigError(f"{recipe.source or 'recipe'}: stages: {unknown[0]!r} is not a stage of app "
                          f"{recipe.app!r}; its stages are {', '.join(registry)}")
    stray = [k for k in recipe.sections if k not in registry]
    if stray:
        raise ConfigError(f"{recipe.source or 'recipe'}: {stray[0]!r} is neither a recipe field nor a stage of app "
                          f"{recipe.app!r} (its stages: {', '.join(registry)})")
    for name in recipe.sections:  # a section the recipe does not run is still checked: a typo fails early
        if name not in recipe.stages:
            registry[name].configure(recipe)
    return {name: registry[name].configure(recipe) for name in recipe.stages}


def fingerprints(recipe: Recipe, registry: dict[str, Stage], configs: dict[str, Any] | None = None) -> dict[str, str]:
    """Fingerprint of every stage of the recipe, upstream first (a change upstream changes downstream).
    ``configs``: :func:`configure`'s result when the caller has it already."""
    fps: dict[str, str] = {}
    configs = configs if configs is not None else configure(recipe, registry)
    for name in recipe.stages:
        st = registry[name]
        cfg = configs[name]
        fps[name] = _digest({
            "stage": name, "lmstack": __version__, "seed": recipe.seed, "device": recipe.device,
            "dtype": recipe.dtype, "config": cfg.model_dump(mode="json") if cfg is not None else None,
            "depends": st.depends(recipe), "inputs": st.inputs(recipe),
            "deps": {d: fps[d] for d in st.deps(recipe) if d in fps},
        })
    return fps


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """One runner per run directory: a second concurrent ``lmstack run`` fails with a clear message."""
    lock = run_dir / ".lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, OSError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise LmstackError(f"{run_dir} is in use by another lmstack run (pid {pid}); wait for it or "
                               f"choose another run_dir") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _clear(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def plan_stages(recipe: Recipe, registry: dict[str, Stage], *, from_stage: str | None = None,
                only: str | None = None) -> list[tuple[str, str, str]]:
    """What :func:`run_stages` would do, without doing it: ``(stage, "skip"|"run"|"resume", reason)``."""
    configs = configure(recipe, registry)  # a stage's outputs can depend on its config (finetune: its run_dir)
    fps = fingerprints(recipe, registry, configs)
    forced = set(recipe.stages[recipe.stages.index(from_stage):]) if from_stage in recipe.stages else set()
    out = []
    for name in recipe.stages:
        if only is not None and recipe.stages.index(name) > recipe.stages.index(only):
            break
        state = _read_state(recipe.run_path / "state" / f"{name}.json")
        ctx = StageContext(recipe, name, recipe.run_path, config=configs[name])
        same = state is not None and state.get("fingerprint") == fps[name]
        status = state.get("status") if state else None
        if only is not None and name != only:
            out.append((name, "skip", "upstream of --only" if same and status == "done" else "NOT DONE: --only fails"))
        elif name in forced:
            out.append((name, "run", "--from"))
        elif not same:
            out.append((name, "run", "never run" if state is None else "config, inputs or an upstream stage changed"))
        elif status == "running":
            out.append((name, "resume", "interrupted last time"))
        elif not all(p.exists() for p in registry[name].outputs(ctx)):
            out.append((name, "run", "outputs missing"))
        elif only is not None:
            out.append((name, "run", "--only"))
        else:
            out.append((name, "skip", f"up to date ({state.get('seconds', 0):.0f} s last run)"))
    return out


def run_stages(recipe: Recipe, registry: dict[str, Stage], *, from_stage: str | None = None,
               only: str | None = None, console: Any = None, show_progress: bool | None = None) -> PipelineResult:
    """Run the recipe's stages with skip / resume semantics (see the module docstring)."""
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in recipe.stages:
            raise ConfigError(f"{flag} {value}: not a stage of this recipe; its stages are {', '.join(recipe.stages)}")
    if from_stage and only:
        raise ConfigError("use either --from or --only, not both")
    run_dir = recipe.run_path
    state_dir = run_dir / "state"
    configs = configure(recipe, registry)
    fps = fingerprints(recipe, registry, configs)
    forced = set(recipe.stages[recipe.stages.index(from_stage):]) if from_stage else set()
    t_start = time.perf_counter()
    results: list[StageResult] = []
    summaries: dict[str, dict[str, Any]] = {}
    with _run_lock(run_dir):
        save_config(recipe, run_dir / "recipe.yaml")
        disable = None if show_progress is None else not show_progress
        with progress(disable=disable) as bar:
            task = bar.add_task("pipeline", total=len(recipe.stages))
            if console is not None:
                console = bar.console  # print through the live display's console so lines land above the bars
            for i, name in enumerate(recipe.stages):
                st = registry[name]
                bar.update(task, description=f"[{i + 1}/{len(recipe.stages)}] {name}")
                state_path = state_dir / f"{name}.json"
                state = _read_state(state_path)
                ctx = StageContext(recipe, name, run_dir, config=configs[name], summaries=summaries, console=console)
                same = state is not None and state.get("fingerprint") == fps[name]
                if only is not None and recipe.stages.index(name) > recipe.stages.index(only):
                    break
                if only is not None and name != only:
                    if not (same and state.get("status") == "done"):
                        raise LmstackError(f"--only {only}: the upstream stage {name!r} has not completed with the "
                                           f"current config; run `lmstack run {recipe.source or 'RECIPE'}` first")
                    summaries[name] = state.get("summary", {})
                    results.append(StageResult(name, "skipped", 0.0, summaries[name], fps[name]))
                    bar.advance(task)
                    continue
                outputs_ok = all(p.exists() for p in st.outputs(ctx))
                if same and state.get("status") == "done" and outputs_ok and name not in forced and only is None:
                    summaries[name] = state.get("summary", {})
                    results.append(StageResult(name, "skipped", 0.0, summaries[name], fps[name]))
                    if console is not None:
                        console.print(f"[dim]- {name}: up to date, skipped ({state.get('seconds', 0):.0f} s last run)[/dim]")
                    bar.advance(task)
                    continue
                ctx.resume = same and state.get("status") == "running" and name not in forced
                if not ctx.resume:
                    _clear(ctx.out_dir)
                if console is not None:
                    console.rule(f"[bold]{i + 1}/{len(recipe.stages)} {name}[/bold]"
                                 + (" (resuming)" if ctx.resume else "") + (f" -- {st.description}" if st.description else ""))
                started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                atomic_write_json(state_path, {"status": "running", "fingerprint": fps[name], "started": started})
                t0 = time.perf_counter()
                try:
                    summary = st.run(ctx) or {}
                except (KeyboardInterrupt, Terminated) as e:  # Ctrl-C -> 130, SIGTERM -> 143
                    stop = StageInterrupted(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'} during "
                                            f"stage {name}; run the same command again to resume (finished stages "
                                            f"are skipped)")
                    stop.exit_code = 143 if isinstance(e, Terminated) else 130
                    raise stop from None
                seconds = time.perf_counter() - t0
                atomic_write_json(state_path, {"status": "done", "fingerprint": fps[name], "started": started,
                                               "seconds": round(seconds, 2), "summary": summary})
                summaries[name] = summary
                results.append(StageResult(name, "resumed" if ctx.resume else "ran", seconds, summary, fps[name]))
                bar.advance(task)
    return PipelineResult(recipe, run_dir, results, time.perf_counter() - t_start)
