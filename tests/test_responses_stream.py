"""``/v1/responses`` with ``stream: true`` on a live server, driven by the ``openai`` client: the raw event
sequence (``client.responses.create(stream=True)``) and the client's own accumulator
(``client.responses.stream(...)``), which rejects inconsistent ids, indices and snapshots. The streamed output
must equal the non-streamed one for the same greedy request (text, JSON-schema output, a forced tool call).
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.eval_fixtures import one_thread
from tests.serve_fixtures import LiveServer, tiny_model_dir

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    model_dir = tiny_model_dir(tmp_path_factory.mktemp("responses") / "model", seed=5, max_position_embeddings=2048)
    with LiveServer(create_app(L.load(model_dir, max_num_seqs=8), served_model_name="tiny")) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _types(events):
    return [e.type for e in events]


def test_stream_text_events_and_equal_to_blocking(client):
    kw = dict(model="tiny", input="Say something.", max_output_tokens=12, temperature=0)
    events = list(client.responses.create(stream=True, **kw))
    types = _types(events)
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # 12 tokens run out: incomplete, as the blocking answer says
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert done.text == deltas == final.output_text
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    assert final.usage.output_tokens == 12 and final.incomplete_details.reason == "max_output_tokens"
    blocking = client.responses.create(**kw)
    assert blocking.output_text == final.output_text and blocking.status == final.status == "incomplete"


def test_stream_helper_accumulates_json_schema_output(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]}},
              "required": ["ok", "tag"], "additionalProperties": False}
    kw = dict(model="tiny", input="JSON please.", max_output_tokens=40, temperature=0,
              text={"format": {"type": "json_schema", "name": "r", "schema": schema, "strict": True}})
    with client.responses.stream(**kw) as stream:
        seen = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.output_text.delta" in seen and seen[-1] == "response.completed"
    obj = json.loads(final.output_text)
    assert isinstance(obj["ok"], bool) and obj["tag"] in ("red", "green")
    assert final.output_text == client.responses.create(**kw).output_text


def test_stream_function_call_events(client):
    kw = dict(model="tiny", input="Weather in Paris?", tools=[TOOL], tool_choice="required",
              parallel_tool_calls=False, max_output_tokens=200, temperature=0)
    events = list(client.responses.create(stream=True, **kw))
    types = _types(events)
    assert types[-1] == "response.completed"
    i = types.index("response.output_item.added")
    added = events[i]
    assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.arguments == ""
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    item_done = next(e for e in events if e.type == "response.output_item.done")
    assert done.arguments == args == item_done.item.arguments and item_done.item.call_id == added.item.call_id
    assert json.loads(args)["city"] in ("Paris", "Rome")
    blocking = client.responses.create(**kw)
    call = [o for o in blocking.output if o.type == "function_call"]
    assert len(call) == 1 and call[0].name == "get_weather" and json.loads(call[0].arguments) == json.loads(args)
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["function_call"] and final.output[0].arguments == args


def test_stream_bad_request_is_400_before_streaming(client):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input="x", stream=True, tools=[{**TOOL, "name": ""}])
