"""The Python-syntax guard in pass@k evaluation: ``lmstack eval --syntax-constrained`` / the code task's
``syntax_constrained`` option decodes each completion as a continuation of its own prompt, so a completion that
ends (end of turn or a stop string) parses together with the prompt.

A tiny random model is pushed to end at once (``logit_bias`` on its end-of-turn token, or on the newline that
completes a stop string): unguarded, its completions stop before the function has a body and do not parse (the
check can fail); guarded, every ending completion parses. The reference is CPython's own parser (``ast.parse``
of ``prompt + completion``), which the test calls itself.
"""

from __future__ import annotations

import ast
import dataclasses
import json

import pytest
import torch

import lmstack.serve.types as types_mod
from lmstack.serve.types import SamplingParams, StructuredOutput
from lmstack.tokenizer import Tokenizer
from tests.serve_fixtures import shared_model_dir

torch.set_num_threads(2)

PROMPTS = ["def add(a, b):\n", "def first(xs):\n    if xs:\n", "def f(x):\n    return (x +"]


def parses(src: str) -> bool:
    try:
        ast.parse(src)
        return True
    except SyntaxError:
        return False


@pytest.fixture(scope="module")
def model_dir():
    return shared_model_dir()  # the serve tests' tiny model (one per test process)


@pytest.fixture(scope="module")
def llm(model_dir):
    import lmstack.serve.llm as L

    return L.load(model_dir, max_num_seqs=16)


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


def _run(llm, prompts, guard: bool, **kw):
    base = SamplingParams(n=3, temperature=0.8, seed=4, max_tokens=24, **kw)
    params = [dataclasses.replace(base, structured=StructuredOutput("python", p)) if guard else base
              for p in prompts]
    return llm.generate(prompts, params, use_tqdm=False)  # one SamplingParams per prompt: its own prefix


def test_end_of_turn_only_where_prompt_plus_completion_parses(llm, tok):
    eos = tok.token_to_id("<|im_end|>")
    free = _run(llm, PROMPTS, guard=False, logit_bias={eos: 12.0})
    assert not any(parses(p + c.text) for p, o in zip(PROMPTS, free) for c in o.outputs)  # the model quits at once
    guarded = _run(llm, PROMPTS, guard=True, logit_bias={eos: 12.0})
    ended = [(p, c) for p, o in zip(PROMPTS, guarded) for c in o.outputs if c.finish_reason == "stop"]
    # a random model writes noise (an open string, a backslash continuation) that may never close in 24 tokens;
    # "def add(a, b):\n" needs one token of body to be complete, and every sample of it ends
    assert sum(p == PROMPTS[0] for p, _ in ended) == 3
    for p, c in ended:
        assert parses(p + c.text), (p, c.text)
        assert c.constraint_satisfied is True
    for p, o in zip(PROMPTS, guarded):
        for c in o.outputs:
            assert c.constraint_satisfied == parses(p + c.text)


def test_a_prompt_that_already_parses_still_gets_code(llm, tok):
    """A signature with only a docstring compiles: ending at once would be an empty completion, which the guard
    does not allow when there is a prefix (it must add a line of code)."""
    eos = tok.token_to_id("<|im_end|>")
    prompt = ['def g(x):\n    """Double x."""\n']
    assert parses(prompt[0])
    free = _run(llm, prompt, guard=False, logit_bias={eos: 12.0})[0].outputs
    assert all(c.text == "" for c in free)  # unguarded the model ends at once
    guarded = _run(llm, prompt, guard=True, logit_bias={eos: 12.0})[0].outputs
    for c in guarded:
        assert c.text.strip() and (c.finish_reason == "length" or parses(prompt[0] + c.text)), c.text


def test_stop_string_only_where_code_before_it_parses(llm, tok):
    nl = tok.encode("\n")
    assert len(nl) == 1
    eos = tok.token_to_id("<|im_end|>")
    kw = dict(stop=["\n"], logit_bias={nl[0]: 10.0, eos: -100.0})  # it can end only on the stop string
    free = _run(llm, PROMPTS, guard=False, **kw)
    assert sum(parses(p + c.text) for p, o in zip(PROMPTS, free) for c in o.outputs) < len(PROMPTS)
    guarded = _run(llm, PROMPTS, guard=True, **kw)
    ended = [(p, c) for p, o in zip(PROMPTS, guarded) for c in o.outputs if c.finish_reason == "stop"]
    assert ended
    for p, c in ended:
        assert "\n" not in c.text and parses(p + c.text), (p, c.text)
        assert c.constraint_satisfied is True
    # a completion cut by max_tokens is the only kind that may not parse, and the guard says so
    for p, o in zip(PROMPTS, guarded):
        for c in o.outputs:
            if c.finish_reason == "length":
                assert c.constraint_satisfied == parses(p + c.text)


def test_per_prompt_params_must_match_prompts(llm):
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="one each"):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2)], use_tqdm=False)


@pytest.fixture()
def eager_eos(model_dir, tok, monkeypatch):
    """Every SamplingParams the evaluation builds favours ending at once (a model that wants to stop)."""
    eos = tok.token_to_id("<|im_end|>")

    @dataclasses.dataclass
    class Eager(SamplingParams):
        logit_bias: dict = dataclasses.field(default_factory=lambda: {eos: 12.0})

    monkeypatch.setattr(types_mod, "SamplingParams", Eager)


def _code_task(tmp_path):
    rows = [{"task_id": f"t{i}", "prompt": p, "test": "def check(c):\n    pass\n", "entry_point": "add"}
            for i, p in enumerate(["def add(a, b):\n", "class Box:\n"])]
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": "code_tiny", "type": "code", "data": str(data), "n_samples": 2, "k": [1, 2],
            "temperature": 0.8, "max_tokens": 40, "workers": 1}


def test_eval_syntax_constrained_option(model_dir, tmp_path, eager_eos):
    from lmstack.eval.run import run_eval
    from lmstack.serve.evaluation import generate

    task = _code_task(tmp_path)
    off = run_eval(model_dir, [task], engine=generate, show_progress=False, write_report=False)["tasks"]["code_tiny"]
    assert off["syntax"] == {"constrained": False, "parsed": 0, "total": 4}  # ended at once: no body
    on = run_eval(model_dir, [task], engine=generate, show_progress=False, write_report=False,
                  syntax_constrained=True)["tasks"]["code_tiny"]
    assert on["config"]["syntax_constrained"] is True
    # each prompt is its completion's prefix: without it the empty completion would count as complete code
    assert on["syntax"] == {"constrained": True, "parsed": 4, "total": 4}
    # the same through the task option itself
    opt = run_eval(model_dir, [{**task, "syntax_constrained": True}], engine=generate, show_progress=False,
                   write_report=False)["tasks"]["code_tiny"]
    assert opt["syntax"]["parsed"] == 4


def test_cli_flag(model_dir, tmp_path, eager_eos):
    from typer.testing import CliRunner

    from lmstack.cli import app

    task = _code_task(tmp_path)
    (tmp_path / "t.yaml").write_text(json.dumps({k: v for k, v in task.items() if k != "name"}))
    r = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--tasks", str(tmp_path / "t.yaml"),
                                 "--out", str(tmp_path / "out"), "--syntax-constrained"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    (name,) = res["tasks"]
    assert res["tasks"][name]["syntax"] == {"constrained": True, "parsed": 4, "total": 4}
