"""Structured output and tool calling through the OpenAI-compatible server, driven by the official ``openai``
client and LangChain against a live server on 127.0.0.1.

The model is a tiny random qwen2: it writes noise on its own, so every output that parses and validates (with
``jsonschema``, independently of the grammar engine) does so because the constraint held.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from tests.serve_fixtures import LiveServer, tiny_model_dir

torch.set_num_threads(2)
MSGS = [{"role": "user", "content": "Answer in the requested format."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    d = tiny_model_dir(tmp_path_factory.mktemp("sapi") / "tiny", max_position_embeddings=4096)
    llm = L.load(d, max_num_seqs=32)
    with LiveServer(create_app(llm, served_model_name="tiny")) as s:
        s.dir = d
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


S = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"a": S, "b": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "c": {"type": "boolean"}}, "required": ["a", "b", "c"],
     "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": S, "id": {
        "type": "integer", "minimum": 1, "maximum": 9}}, "required": ["name", "id"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"k": S}, "required": ["k"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "integer", "minimum": -50, "maximum": 50},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "object", "properties": {"x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
     "required": ["x"], "additionalProperties": False},
    {"type": "object", "properties": {"req": S, "opt": S, "opt2": {"type": "integer", "minimum": 0, "maximum": 5}},
     "required": ["req"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}},
     "required": ["start", "end"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "v": {"type": "integer", "minimum": 0,
                                                                      "maximum": 3}},
     "required": ["kind", "v"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 4}}, "required": ["maybe"],
     "additionalProperties": False},
    {"type": "boolean"},
    {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2, "items": {
        "type": "integer", "minimum": 0, "maximum": 9}}},
    {"type": "object", "properties": {"n": {"enum": [1, 2.5, "three", None, True]}}, "required": ["n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 2},
                                      "score": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 10}},
     "required": ["tags", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
     "required": ["level", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {"inner": {
        "type": "object", "properties": {"deep": {"type": "boolean"}}, "required": ["deep"],
        "additionalProperties": False}}, "required": ["inner"], "additionalProperties": False}},
     "required": ["meta"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 1.5, "maximum": 2.5}},
     "required": ["price"], "additionalProperties": False},
]


def test_json_schema_many(client):
    def one(i_schema):
        i, schema = i_schema
        r = client.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=300, temperature=1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                    "strict": True}})
        return r.choices[0]

    with ThreadPoolExecutor(8) as ex:  # concurrently: constrained requests share engine steps
        choices = list(ex.map(one, enumerate(SCHEMAS)))
    assert len(SCHEMAS) >= 20
    for schema, c in zip(SCHEMAS, choices):
        assert c.finish_reason == "stop", (schema, c.message.content)
        jsonschema.validate(json.loads(c.message.content), schema)
        assert c.model_extra.get("constraint_satisfied") is True


class Address(BaseModel):
    city: str = Field(max_length=8)
    zip: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=130)
    role: Literal["admin", "user"]
    address: Address
    nickname: Optional[str] = Field(default=None, max_length=5)


def test_parse_with_pydantic(client):
    r = client.chat.completions.parse(model="tiny", messages=MSGS, response_format=Person, max_tokens=300, seed=2)
    p = r.choices[0].message.parsed
    assert isinstance(p, Person) and 10000 <= p.address.zip <= 99999 and p.role in ("admin", "user")


def test_json_object_regex_choice_and_logit_bias(client, server):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=200, seed=1, n=2,
                                       response_format={"type": "json_object"})
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    rx = r"[0-9]{3}-[a-z]{2,4}"
    for body in ({"guided_regex": rx}, {"regex": rx}, {"structured_outputs": {"regex": rx}}):
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, seed=4, extra_body=body)
        assert re.fullmatch(rx, r.choices[0].message.content), body
    opts = ["alpha", "beta", "gamma delta"]
    for body in ({"guided_choice": opts}, {"choice": opts}, {"structured_outputs": {"choice": opts}}):
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, n=3, seed=5, extra_body=body)
        assert all(c.message.content in opts for c in r.choices)
    gbnf = 'root ::= "(" [0-9] ("," [0-9])* ")"'
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=30, seed=6,
                                       extra_body={"guided_grammar": gbnf})
    assert re.fullmatch(r"\([0-9](,[0-9])*\)", r.choices[0].message.content) or r.choices[0].finish_reason == "length"
    # the legacy completions API takes the same extras; guided_json with a schema
    r = client.completions.create(model="tiny", prompt="x", max_tokens=60, seed=7,
                                  extra_body={"guided_json": SCHEMAS[3]})
    assert json.loads(r.choices[0].text)["color"] in ("red", "green", "blue")
    # logit_bias: +100 on one token forces it
    from lmstack.tokenizer import Tokenizer

    r = client.completions.create(model="tiny", prompt="x", max_tokens=3, seed=0, temperature=1.0,
                                  logit_bias={"42": 100})
    assert r.choices[0].text == Tokenizer.from_dir(server.dir).decode([42, 42, 42])


def test_streaming_json_and_length_finish(client):
    schema = SCHEMAS[0]
    kw = dict(model="tiny", messages=MSGS, seed=11, temperature=1.0,
              response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    full = client.chat.completions.create(max_tokens=200, **kw).choices[0].message.content
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        max_tokens=200, stream=True, **kw) if ch.choices)
    assert text == full and jsonschema.validate(json.loads(text), schema) is None
    cut = client.chat.completions.create(max_tokens=3, **kw).choices[0]
    assert cut.finish_reason == "length" and cut.model_extra["constraint_satisfied"] is False
    assert "max_tokens" in cut.model_extra["warning"]


# ---------------------------------------------------------------------------------------------- tools
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer", "minimum": 0,
                                                                        "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_tools_required_named_and_streaming(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                           max_tokens=400, seed=seed, parallel_tool_calls=False)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=named, max_tokens=400,
                                       seed=9)
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "add" for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA_OF["add"])
    # streamed tool-call deltas reassemble to the same calls as the non-streamed answer (same seed)
    kw = dict(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required", max_tokens=400, seed=4)
    whole = client.chat.completions.create(**kw).choices[0]
    acc: dict[int, dict] = {}
    finish = None
    for ch in client.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            e = acc.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            e["id"] = e["id"] or tc.id
            e["name"] += tc.function.name or ""
            e["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(acc.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert all(e["id"] and e["id"].startswith("call_") for e in acc.values())


def test_tool_results_round_trip_and_none(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                       max_tokens=400, seed=1, parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    msgs = MSGS + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    r2 = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=8, seed=1)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice none: the tools stay out of the prompt and no call is parsed
    r3 = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=8,
                                        seed=1)
    r4 = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, seed=1)
    assert r3.choices[0].message.tool_calls is None and r3.usage.prompt_tokens == r4.usage.prompt_tokens


def test_generic_and_native_tool_prompts():
    from lmstack.serve.api.tools import render_messages, template_has_tools

    qwen_like = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
    assert template_has_tools(qwen_like) and not template_has_tools("{{ messages[0]['content'] }}")
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    native, tools = render_messages(msgs, TOOLS, True, "auto")
    assert tools == TOOLS and native[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    generic, tools = render_messages(msgs, TOOLS, False, "auto")
    assert tools is None and generic[0]["role"] == "system" and '"name": "get_weather"' in generic[0]["content"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in generic[2]["content"]
    assert generic[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}


def test_bad_input_is_400_with_the_reason(client, server):
    def err(**kw):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, **kw)
        return e.value.body["message"], e.value.body.get("param")

    msg, param = err(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}})
    assert "schema" in msg and param == "response_format"
    msg, param = err(extra_body={"guided_regex": "a(b"})
    assert "regex" in msg and "unclosed group" in msg and param == "guided_regex"
    msg, _ = err(extra_body={"guided_grammar": 'root ::= "a" undefined_rule'})
    assert "grammar" in msg
    msg, _ = err(tools=[{"type": "function", "function": {"parameters": {}}}])
    assert "name" in msg
    msg, param = err(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in msg and param == "tool_choice"
    msg, _ = err(tools=[WEATHER] * 2)
    assert "two tools" in msg
    msg, _ = err(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)])
    assert "at most 128" in msg
    msg, _ = err(extra_body={"guided_regex": "a" * 70_000})
    assert "KiB" in msg
    msg, _ = err(extra_body={"guided_choice": ["x"] * 300})
    assert "at most" in msg
    msg, _ = err(extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert "at most one" in msg
    msg, _ = err(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert "both constrain" in msg
    msg, _ = err(logit_bias={"abc": 1})
    assert "token id" in msg
    msg, _ = err(logit_bias={"5": 500})
    assert "[-100, 100]" in msg
    # a body over the request cap never reaches the compiler
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(800)}}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
            "name": "big", "schema": big}}})
    assert r.status_code == 400 and "KiB" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- LangChain
def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key="x", max_tokens=400, seed=3,
                     temperature=1.0, max_retries=0)
    msg = llm.bind_tools([WEATHER, ADD], tool_choice="required").invoke("What is 2 + 3?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] in SCHEMA_OF
    jsonschema.validate(msg.tool_calls[0]["args"], SCHEMA_OF[msg.tool_calls[0]["name"]])
    out = llm.with_structured_output(Person, method="json_schema").invoke("Describe a person.")
    assert isinstance(out, Person)
    out = llm.with_structured_output(Address, method="function_calling").invoke("An address.")
    assert isinstance(out, Address)
