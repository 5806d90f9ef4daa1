"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) and its web chat.

    from lmstack.serve.api import create_app, run_server
    app = create_app(lmstack.serve.llm.load("model_dir"), api_key="sk-...")   # any ASGI server
    run_server("model_dir", port=8000)                                         # what `lmstack serve` runs

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics, GET /.
See docs/serving.md.
"""

from lmstack.serve.api.app import create_app
from lmstack.serve.api.server import build_server, run_server

__all__ = ["create_app", "run_server", "build_server"]
