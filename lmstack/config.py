"""Typed configs from YAML plus dotted command-line overrides.

Every stage defines a pydantic model with CPU-friendly defaults. ``load_config(Model, path, overrides)``
reads the YAML, applies ``--section.key=value`` overrides (values parsed as YAML scalars), validates, and
raises :class:`ConfigError` naming the field and what is allowed. ``save_config`` writes the resolved config
into the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmstack.errors import ConfigError
from lmstack.utils.io import atomic_write_text

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for lmstack configs: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def read_yaml(path: str | Path, *, expect: type = dict, error: type[Exception] = ConfigError,
              what: str = "config file") -> Any:
    """Parse a YAML file whose top level must be ``expect`` (a mapping by default).

    Problems raise ``error`` naming the file and, for a syntax error, the line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        if b"\x00" in raw[:8192]:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: a binary file, not YAML text ({e.reason} at byte {e.start}); pass a {what}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        raise error(f"{path}{where}: invalid YAML ({why})") from None
    if data is None:
        data = expect()
    if not isinstance(data, expect):
        kind = "a mapping" if expect is dict else "a list" if expect is list else expect.__name__
        raise error(f"{path}: expected {kind} at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` (a leading ``--`` is allowed) to a nested dict, in place."""
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def validate(model: type[T], data: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """``model`` from ``data``; errors name ``source`` and each field as ``prefix.field.path``."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join([prefix] * bool(prefix) + [str(x) for x in err["loc"]]) or "(top level)"
            lines.append(f"{loc}: {err['msg']}" + (f" (got {err.get('input')!r})" if "input" in err and not isinstance(err.get("input"), dict) else ""))
        raise ConfigError(f"{source}: invalid config: " + "; ".join(lines)) from None


def load_config(model: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides)
    return validate(model, data, str(path or "config"))


def save_config(cfg: BaseModel, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))


# ------------------------------------------------------------------------------------- stage sections
# A recipe (``lmstack run``) is a YAML file with a ``name`` and ``stages``; each stage section is that stage's
# own typed config. ``lmstack pretrain -c``, ``lmstack finetune -c`` and ``lmstack run`` read a section through
# :func:`stage_section`, so one file gives one run however it is started.
RECIPE_DEFAULTS = ("seed", "device", "dtype")  # recipe-level keys that are defaults for every stage's train:


def is_recipe(doc: dict[str, Any]) -> bool:
    """A recipe names its stages; a bare stage config does not."""
    return isinstance(doc, dict) and "stages" in doc


def stage_section(doc: dict[str, Any], section: str, wired: dict[str, Any] | None = None,
                  source: str = "recipe") -> dict[str, Any]:
    """The raw config of stage ``section`` from a recipe document, by one rule:

    1. the section's own keys win;
    2. ``wired`` (paths the pipeline connects: upstream outputs, the base model) fills what the section leaves unset;
    3. the recipe's ``seed``, ``device`` and ``dtype`` are defaults for the section's ``train:`` (its own
       ``train.seed`` etc. win);
    4. ``run_dir`` defaults to ``<recipe run_dir or runs/NAME>/<section>``.

    A document that is not a recipe is returned as it is (a bare stage config)."""
    if not is_recipe(doc):
        return dict(doc)
    raw = doc.get(section)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(raw).__name__}")
    if section == "finetune" and "config" in raw:
        raise ConfigError(f"{source}: finetune.config: the finetune section is now the fine-tuning config itself "
                          "(lmstack.tune.FinetuneConfig); move the keys under finetune.config up one level")
    out = _merge_defaults(raw, wired or {})
    train = dict(out.get("train") or {})
    for key in RECIPE_DEFAULTS:
        if doc.get(key) is not None:
            train.setdefault(key, doc[key])
    if train:
        out["train"] = train
    base = doc.get("run_dir") or f"runs/{doc.get('name') or section}"
    out.setdefault("run_dir", str(Path(base) / section))
    return out


def _merge_defaults(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(given)
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_defaults(out[k], v)
        else:
            out.setdefault(k, v)
    return out


def load_stage_config(model: type[T], path: str | Path | None, section: str, overrides: Iterable[str] = (),
                      wired: dict[str, Any] | None = None) -> T:
    """Read stage ``section`` of a recipe (or a bare stage config file) by :func:`stage_section`'s rule, apply
    ``key=value`` overrides addressed to the stage config (``train.lr=3e-4``), validate."""
    doc = read_yaml(path) if path else {}
    data = stage_section(doc, section, wired, str(path or "config"))
    apply_overrides(data, overrides)
    return validate(model, data, str(path or "config"), prefix=section if is_recipe(doc) else "")
