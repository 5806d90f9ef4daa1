"""The OpenAPI schema describes what `lmstack serve` does: schemathesis generates requests from it and sends them to
the live server on 127.0.0.1 (0 server errors, every status, content type, header and body as documented).

The examples per operation are bounded here (``LMSTACK_SCHEMATHESIS_EXAMPLES``, default 15); ``make
test-schemathesis`` runs many more.
"""

from __future__ import annotations

import os

import httpx
import pytest
import torch

from tests.serve_fixtures import LiveServer, shared_model_dir

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance, not_a_server_error, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

torch.set_num_threads(2)
KEY = "sk-schema"
EXAMPLES = int(os.environ.get("LMSTACK_SCHEMATHESIS_EXAMPLES", "15"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live():
    import lmstack.serve.llm as L
    from lmstack.serve.api import create_app

    # a short context keeps every generated request short (max_tokens defaults to what the context leaves)
    llm = L.load(shared_model_dir(), max_num_seqs=8, max_model_len=48)
    app = create_app(llm, api_key=KEY, served_model_name="tiny", max_request_bytes=256 * 1024)
    with LiveServer(app) as s:
        yield s


def test_live_server_conforms_to_its_openapi_schema(live):
    from hypothesis import given

    # schemathesis's pytest plugin does not load under this pytest; its strategies run the same generation
    api = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [r.ok() for r in api.get_all_operations()]
    assert len(operations) >= 8
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def conforms(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=120)

        conforms()
    # the generated requests reached the engine (the schema names the served model), not only the 4xx paths
    text = httpx.get(live.url + "/metrics").text
    generated = next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("lmstack_generation_tokens"))
    assert generated > 0


def test_schema_declares_what_the_routes_answer(live):
    doc = httpx.get(live.url + "/openapi.json").json()
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]  # Prometheus text, not JSON
    assert httpx.get(live.url + "/metrics").headers["content-type"].startswith("text/plain")
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "413", "422", "429", "503"} <= set(chat["responses"])
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["security"] and "bearer" in doc["components"]["securitySchemes"]
    assert "404" in doc["paths"]["/v1/models/{name}"]["get"]["responses"]
    # a method the route does not have: 405 with Allow, in OpenAI's error shape
    for method, path in (("TRACE", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("PUT", "/health")):
        r = httpx.request(method, live.url + path, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 405 and r.headers["allow"] in ("POST", "GET"), (method, path, r.headers)
        assert r.json()["error"]["type"] == "invalid_request_error"
