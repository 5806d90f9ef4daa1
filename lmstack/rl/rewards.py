"""Rewards: verifiable Python functions, or a trained reward model.

A reward function is ``fn(prompt: str, response: str, record: dict) -> float``; ``record`` is the prompt's
data row, so the answer, the unit tests or a schema travel with the prompt. Built in:

* ``exact_answer`` -- 1.0 when the last number in the response (or, for a non-numeric answer, the response's
  stripped first line) equals ``record["answer"]``; 0.0 otherwise. Numbers compare as numbers (``81.0`` = ``81``).
* ``json_schema`` -- 1.0 when the response is a JSON value valid against ``record["schema"]`` (or the config's
  ``reward.schema``); 0.5 for valid JSON that breaks the schema; 0.0 for no JSON. (``jsonschema`` package.)
* ``unit_tests`` -- 1.0 when the response's code followed by ``record["tests"]`` runs to its end in the code
  sandbox (:mod:`lmstack.eval.sandbox`: bubblewrap, no network, rlimits); 0.0 otherwise. Generated code is
  untrusted: it never runs outside the sandbox.
* ``module.path:function`` -- any importable function with the signature above.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from typing import Any, Callable

from lmstack.errors import ConfigError

RewardFn = Callable[[str, str, dict], float]
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _as_number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def exact_answer(prompt: str, response: str, record: dict) -> float:
    want = str(record.get("answer", "")).strip()
    if not want:
        return 0.0
    target = _as_number(want)
    if target is not None:
        found = _NUMBER.findall(response)
        got = _as_number(found[-1]) if found else None
        return 1.0 if got is not None and math.isclose(got, target, rel_tol=0, abs_tol=1e-9) else 0.0
    first = response.strip().splitlines()[0].strip() if response.strip() else ""
    return 1.0 if first == want else 0.0


def _first_json(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").split("\n", 1)[-1]
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text[i:])[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON")


def json_schema_reward(schema: dict | None = None) -> RewardFn:
    import jsonschema

    def reward(prompt: str, response: str, record: dict) -> float:
        s = record.get("schema", schema)
        if isinstance(s, str):
            s = json.loads(s)
        try:
            value = _first_json(response)
        except ValueError:
            return 0.0
        if s is None:
            return 1.0
        try:
            jsonschema.validate(value, s)
        except jsonschema.ValidationError:
            return 0.5
        return 1.0
    return reward


def unit_tests(prompt: str, response: str, record: dict) -> float:
    from lmstack.eval.sandbox import run_code

    code = response
    m = re.search(r"```(?:python)?\n(.*?)```", response, re.S)
    if m:
        code = m.group(1)
    program = f"{record.get('prefix', '')}{code}\n\n{record.get('tests', '')}\n"
    return 1.0 if run_code(program, timeout=float(record.get("timeout", 5.0))).passed else 0.0


BUILTIN = {"exact_answer": lambda cfg: exact_answer, "json_schema": lambda cfg: json_schema_reward(cfg),
           "unit_tests": lambda cfg: unit_tests}


def load_reward_function(name: str, schema: dict | None = None) -> RewardFn:
    """A built-in name or ``module.path:function``; a bad name is one clear error."""
    if name in BUILTIN:
        return BUILTIN[name](schema)
    if ":" not in name:
        raise ConfigError(f"reward.function {name!r} is not a built-in ({', '.join(BUILTIN)}) nor "
                          "module.path:function")
    mod, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.function {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"reward.function {name!r} is not callable")
    return fn


def score_all(fn: RewardFn, prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    out = []
    for p, r, rec in zip(prompts, responses, records):
        v = float(fn(p, r, rec))
        if not math.isfinite(v):
            raise ValueError(f"the reward function returned {v} for response {r[:60]!r}")
        out.append(v)
    return out
