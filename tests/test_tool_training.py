"""Teaching tool calls: the synthetic tool chats, SFT records with tools rendered as the server renders them, and
the ``tool_calls`` eval task's metrics on fixed predictions."""

from __future__ import annotations

import ast
import json
import shutil
from collections import Counter

import jsonschema
import pytest

from lmstack.data.toolchat import HELDOUT_TOOLS, KINDS, TRAIN_TOOLS, tool_chats
from lmstack.tune.data import BadRecord, load_sft, render_record, to_messages
from tests.tune_fixtures import make_model_dir, write_jsonl

PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def mdir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tool_training_model"))


@pytest.fixture(scope="module")
def plain_tok(mdir, tmp_path_factory):
    """The same tokenizer with a ChatML template that knows nothing of tools (SmolLM2's kind)."""
    from lmstack.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("plain_tok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(mdir / f, d / f)
    (d / "chat_template.jinja").write_text(PLAIN_CHATML, encoding="utf-8")
    return Tokenizer.from_dir(d)


def _schemas(rec):
    return {t["function"]["name"]: t["function"]["parameters"] for t in rec["tools"]}


def test_tool_chats_are_deterministic_valid_and_cover_every_kind():
    recs = tool_chats(300, seed=3)
    assert recs == tool_chats(300, seed=3) and recs != tool_chats(300, seed=4)
    assert set(Counter(r["kind"] for r in recs)) == set(KINDS)
    assert {r["lang"] for r in recs} == {"en", "zh"}
    for r in recs:
        schemas = _schemas(r)
        last = r["messages"][-1]
        for m in r["messages"]:
            for c in m.get("tool_calls") or []:
                args = json.loads(c["function"]["arguments"])
                jsonschema.validate(args, schemas[c["function"]["name"]])  # every call is offered and valid
                if "code" in args:
                    tree = ast.parse(args["code"])
                    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
                    assert classes and f"Class named {classes[0]}" in r["messages"][0]["content"] or \
                        f"类名为{classes[0]}" in r["messages"][0]["content"]
                    asked_safe = "Thread-safe" in r["messages"][0]["content"] or "线程安全" in r["messages"][0]["content"]
                    assert ("threading.Lock()" in args["code"]) == asked_safe
        if r["kind"] == "parallel":
            assert len(last["tool_calls"]) == 2
        if r["kind"] in ("none", "result"):
            assert not last.get("tool_calls") and last["content"]
    held = tool_chats(50, seed=3, heldout=True)
    train_names = {t.name for t in TRAIN_TOOLS}
    assert {t.name for t in HELDOUT_TOOLS}.isdisjoint(train_names)
    assert all(not (set(_schemas(r)) & train_names) for r in held)  # held-out records offer unseen tools only


def test_code_records_run_and_every_method_returns(tmp_path):
    """The code the chats teach is code a user would keep: every class of every variant (thread-safe or not) is
    built by its usage example's constructor and every public method is called, in one fresh interpreter (a method
    that takes the lock and calls another locked method would deadlock here)."""
    import random
    import subprocess
    import sys

    from lmstack.data import toolchat

    rng, seen, progs = random.Random(0), set(), []
    for _ in range(800):
        _, args = toolchat._code(rng, False)
        key = (args["filename"], "threading.Lock()" in args["code"])
        if key in seen:
            continue
        seen.add(key)
        cls = next(n for n in ast.parse(args["code"]).body if isinstance(n, ast.ClassDef))
        calls = []
        for f in cls.body:
            if isinstance(f, ast.FunctionDef) and not f.name.startswith("_"):
                pos = f.args.args[1:len(f.args.args) - len(f.args.defaults)]
                calls.append(f"obj.{f.name}(" + ", ".join(
                    "lambda: 7" if a.arg == "func" else toolchat._DEMO_ARGS.get(a.arg, "1") for a in pos) + ")")
        ctor = args["usage_example"].splitlines()[0]
        progs.append(args["code"] + "\n" + ctor + "\n" + "\n".join(calls) + "\n")
    assert len(seen) == 2 * len(toolchat._CLASSES)  # every class, with and without the lock
    script = tmp_path / "run_all.py"
    script.write_text("import sys\nfor src in sys.argv[1:]:\n    exec(compile(src, 'record', 'exec'), {})\n"
                      "print('ran', len(sys.argv) - 1)\n", encoding="utf-8")
    r = subprocess.run([sys.executable, str(script), *progs], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"ran {len(progs)}", r.stderr[-2000:]


def _trained_text(enc, tok):
    ids = [i for i, m in zip(enc.input_ids, enc.loss_mask) if m]
    return tok.decode(ids)


def test_sft_record_with_tools_renders_like_the_server_and_trains_on_the_calls(plain_tok):
    from lmstack.serve.api.tools import GENERIC_TOOL_PROMPT

    tools = [{"type": "function", "function": {"name": "get_time", "description": "Local time",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    rec = {"tools": tools, "messages": [
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "09:30"},
        {"role": "assistant", "content": "It is 09:30 in Oslo."}]}
    enc = render_record(plain_tok, rec)
    system = GENERIC_TOOL_PROMPT.format(tools=json.dumps(tools[0], ensure_ascii=False))
    assert enc.text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nTime in Oslo?")
    assert "<|im_start|>user\n<tool_response>\n09:30\n</tool_response><|im_end|>" in enc.text
    call = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
    trained = _trained_text(enc, plain_tok)
    assert trained.replace("<|im_end|>", "") == call + "It is 09:30 in Oslo."  # the calls and the answer, nothing else


def test_native_template_renders_tools_itself(mdir):
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.tools import template_has_tools

    tok = Tokenizer.from_dir(mdir)  # lmstack's ChatML template renders tools (Hermes / Qwen2.5 convention)
    assert template_has_tools(tok.chat_template)
    rec = tool_chats(40, seed=1)[0]
    enc = render_record(tok, rec)
    want = tok.render_chat(to_messages(rec) and [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in rec["messages"]], tools=rec["tools"])
    assert enc.input_ids == want.input_ids and enc.loss_mask == want.loss_mask


def test_bad_tool_records_are_counted_not_fatal(tmp_path, plain_tok):
    good = tool_chats(3, seed=0)
    rows = good + [
        {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
                      {"role": "assistant", "content": "y"}]},
        {"tools": [{"function": {"description": "no name"}}], "messages": good[0]["messages"]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "{not json"}}]}]},
    ]
    exs, report = load_sft(write_jsonl(tmp_path / "t.jsonl", rows), plain_tok, 2048)
    assert len(exs) == 3 and len(report.bad) == 3
    reasons = " | ".join(r for _, r in report.bad)
    assert "only assistant turns call tools" in reasons and "tools[0]" in reasons and "not valid JSON" in reasons
    with pytest.raises(BadRecord, match="no assistant message"):
        to_messages({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]})


# ------------------------------------------------------------------------------------------------ eval task
class _FakeLM:
    """Returns fixed texts; records the prompts it was given."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.prompts = tok, texts, []

    def generate(self, prompts, **kw):
        self.prompts = list(prompts)
        return [[t] for t in self.texts]


def test_tool_calls_task_scores_fixed_predictions_by_hand(tmp_path, plain_tok):
    from lmstack.eval.task import load_task
    from lmstack.eval.toolcalls import evaluate_tool_calls

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
             {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}]

    def call(name, args):
        return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}

    recs = [
        {"kind": "single", "lang": "en", "tools": tools, "messages": [
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "", "tool_calls": [call("f", {"x": 1})]}]},
        {"kind": "parallel", "lang": "en", "tools": tools, "messages": [
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "", "tool_calls": [call("f", {"x": 1}), call("f", {"x": 2})]}]},
        {"kind": "none", "lang": "zh", "tools": tools, "messages": [
            {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
        {"kind": "single", "lang": "zh", "tools": tools, "messages": [
            {"role": "user", "content": "three"}, {"role": "assistant", "content": "", "tool_calls": [call("g", {})]}]},
        "not json",
    ]
    data = tmp_path / "tc.jsonl"
    data.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    texts = [
        'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',  # exact
        '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>\n<tool_call>\n'
        '{"name": "f", "arguments": {"x": "1"}}\n</tool_call>',  # right names, one wrong (and invalid) argument
        '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',  # called when it should not
        "I cannot do that.",  # did not call
    ]
    task = load_task({"type": "tool_calls", "name": "tc", "data": str(data)})
    lm = _FakeLM(plain_tok, texts)
    r = evaluate_tool_calls(lm, task)
    m = r["metrics"]
    assert r["n"] == 4 and r["skipped"] == 1
    assert m["decision_accuracy"] == pytest.approx(2 / 4)  # records 1 and 2 decided right
    assert m["name_accuracy"] == pytest.approx(2 / 3)  # of the 3 records with reference calls
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert m["no_call_accuracy"] == pytest.approx(0.0)
    assert m["args_valid"] == pytest.approx(3 / 4)  # 4 predicted calls, {"x": "1"} violates the integer type
    assert r["breakdown"]["kind=single"] == {"exact_match": 0.5, "n": 2}
    assert r["breakdown"]["lang=zh"] == {"exact_match": 0.0, "n": 2}
    assert lm.prompts[0].endswith("<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\n")
    assert '"name": "g"' in lm.prompts[0]  # the tools are in the prompt as the server puts them


def test_shipped_tool_calls_task_and_cli(tmp_path):
    from typer.testing import CliRunner

    from lmstack.cli import app
    from lmstack.eval.task import load_task

    t = load_task("tool_calls")
    lines = open(t.data, encoding="utf-8").read().splitlines()
    assert len(lines) == 80 and lines == [json.dumps(r, ensure_ascii=False) for r in tool_chats(80, 0, heldout=True)]
    res = CliRunner().invoke(app, ["data", "tool-chats", "--out", str(tmp_path), "--n", "7", "--heldout", "3"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 7
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == 3
    res = CliRunner().invoke(app, ["data", "tool-chats", "--out", str(tmp_path), "--n", "9", "--heldout", "80",
                                   "--mix", "parallel=1, single=0,none=0,result=0,code=0"])
    assert res.exit_code == 0, res.output
    assert {json.loads(x)["kind"] for x in (tmp_path / "train.jsonl").read_text().splitlines()} == {"parallel"}
    assert (tmp_path / "heldout.jsonl").read_text().splitlines() == lines  # the held-out set keeps the default mix
    for bad in ("bogus=1", "parallel=x", "code=-1"):
        res = CliRunner().invoke(app, ["data", "tool-chats", "--out", str(tmp_path), "--mix", bad])
        assert res.exit_code == 2 and "--mix" in res.output, res.output


def test_auto_tool_grammar_is_lazy(plain_tok):
    """tool_choice "auto": any prose, but once the text opens <tool_call> only a valid call may follow."""
    from lmstack.serve.api.tools import tool_grammar
    from lmstack.serve.structured import backend_for

    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    be = backend_for(plain_tok, plain_tok.vocab_size, plain_tok.eos_token_ids)
    make = be.factory(tool_grammar(tools, "auto", parallel=True))

    def walk(text):
        """Feed text token by token; (blocked piece or None, the processor)."""
        p = make()
        for i in plain_tok.encode(text):
            if i not in set(p.allowed_ids()):
                return plain_tok.decode([i]), p
            p.accept(i)
        return None, p

    def can_end(p):
        return any(e in set(p.allowed_ids()) for e in plain_tok.eos_token_ids)

    for ok in ["The time is what it is.", 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}',
               'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
               '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>\n'
               '{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>']:
        blocked, p = walk(ok)
        assert blocked is None, (ok, blocked)
    assert can_end(walk("Just prose.")[1])
    _, p = walk("Checking.\n<tool_call>\n")
    assert not can_end(p)  # an opened call must be finished
    for bad in ['Checking.\n<tool_call>\nI think', '<tool_call>\n{"name": "get_date"',
                '<tool_call>\n{"name": "get_time", "arguments": {"town"']:
        assert walk(bad)[0] is not None, bad
    assert can_end(walk('<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>')[1])
