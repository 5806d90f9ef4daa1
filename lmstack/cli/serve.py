"""``lmstack serve``: the OpenAI-compatible HTTP server and web chat for one model directory."""

from __future__ import annotations

from typing import Optional

import typer

from lmstack.cli.generate import SPEC_K, SPEC_MODEL, TP, speculative_kw


def _keep_state(wrapped, app):
    wrapped.state = app.state  # the served model and limits, for the next wrapper
    return wrapped


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Option(..., "--model", "-m", help="Model directory (Hugging Face layout)."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT layout)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0: all)."),
        port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
        api_key: Optional[list[str]] = typer.Option(
            None, "--api-key", envvar="LMSTACK_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 routes; repeat for several tenants (each key has its "
                 "own prefix cache; LMSTACK_API_KEY: keys separated by spaces)."),
        served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                        help="Model name clients send (default: directory name)."),
        max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Most requests decoded together."),
        max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Context limit (prompt + output)."),
        max_waiting: int = typer.Option(256, "--max-waiting", help="Queued requests before 429."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: best)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: per device)."),
        max_request_bytes: int = typer.Option(16 * 1024 * 1024, "--max-request-bytes", help="Larger bodies get 413."),
        drain_timeout: float = typer.Option(300.0, "--drain-timeout",
                                            help="Seconds SIGTERM waits for in-flight requests."),
        prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching",
                                            help="Reuse KV blocks of shared prompt prefixes."),
        allowed_origin: Optional[list[str]] = typer.Option(None, "--allowed-origin",
                                                           help="Allow browser apps from this origin (CORS); repeat."),
        max_prompt_bytes: Optional[int] = typer.Option(None, "--max-prompt-bytes", min=1,
                                                       help="Longer prompt text gets 400 before tokenizing "
                                                            "(default: 64 bytes per context token, >= 64 KiB)."),
        sanitize: bool = typer.Option(True, "--sanitize/--no-sanitize",
                                      help="Special-token text in chat messages stays text (never control tokens)."),
        log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
        guard: Optional[str] = typer.Option(None, "--guard", help="Guardrails policy YAML (docs/guard.md; "
                                            "`default`: the shipped support policy): input rails before the model, "
                                            "output rails on every chat answer, streamed or not."),
        watermark_key: Optional[int] = typer.Option(None, "--watermark-key", min=0, max=2 ** 63 - 1,
                                                    help="Watermark every answer (green list, docs/guard.md) with "
                                                         "this secret key; requests may also send extra_body "
                                                         "{'watermark': {...}} without it."),
        watermark_gamma: float = typer.Option(0.25, "--watermark-gamma", min=0.001, max=0.999,
                                              help="Green-list fraction."),
        watermark_delta: float = typer.Option(2.0, "--watermark-delta", min=0.0, max=100.0,
                                              help="Logit bias added to the green tokens."),
        watermark_context_width: int = typer.Option(1, "--watermark-context-width", min=1, max=16,
                                                    help="Previous tokens seeding each green list."),
        watermark_scheme: str = typer.Option("lmstack", "--watermark-scheme", help="lmstack (SHA-256 of the "
                                             "context) or hf (transformers' lefthash, for its WatermarkDetector)."),
        speculative_model: Optional[str] = SPEC_MODEL, num_speculative_tokens: int = SPEC_K, tp: int = TP,
        rag: Optional[str] = typer.Option(None, "--rag", help="Answer every chat request from this document index "
                                          "(`lmstack rag index`); responses carry a `sources` field (docs/rag.md)."),
        rag_k: int = typer.Option(5, "--rag-k", min=1, max=50, help="Chunks retrieved per request with --rag."),
        rag_upload: bool = typer.Option(False, "--rag-upload", help="With --rag: accept documents uploaded from the "
                                        "web chat (POST /v1/rag/documents) into the index."),
        rag_rerank: Optional[str] = typer.Option(None, "--rag-rerank", help="With --rag: rerank the top 20 chunks "
                                                 "with a reranker .json (`lmstack rag fit-reranker`), a local "
                                                 "CrossEncoder directory or llm:MODEL / llm-yes:MODEL."),
    ) -> None:
        """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions) with a web chat at /."""
        from lmstack.serve.api import run_server

        wrap = None
        marks = None
        if watermark_key is not None:
            from lmstack.errors import ConfigError
            from lmstack.guard.watermark import check_params

            marks = {"key": watermark_key, "gamma": watermark_gamma, "delta": watermark_delta,
                     "context_width": watermark_context_width, "scheme": watermark_scheme}
            try:  # a bad setting fails here, in one line, before the model loads
                check_params(watermark_gamma, watermark_delta, watermark_context_width, watermark_scheme)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        policy = None
        if guard is not None:
            from lmstack.guard import load_policy

            policy = load_policy(guard)  # "default": the shipped policy; a bad file fails before the model loads
        grounding = None
        if rag is not None:  # the index opens here: a bad path fails before the model loads
            from lmstack.rag.server import rag_wrap

            grounding = rag_wrap(rag, k=rag_k, upload=rag_upload, api_key=api_key or None, rerank=rag_rerank)
        if policy is not None or marks is not None or grounding is not None:
            def wrap(app, llm):
                if grounding is not None:  # inside the guard: the guard's rails see the grounded request
                    app = _keep_state(grounding(app, llm), app)
                if policy is None and marks is None:
                    return app
                app.state.model.watermark = marks  # every request's sampling gets it (serve.api.protocol)
                if policy is None:
                    return app
                from lmstack.guard.asgi import GuardMiddleware, guard_for

                return GuardMiddleware(app, guard_for(policy, llm), api_key=api_key or None,
                                       max_body=app.state.max_request_bytes)
        run_server(model, adapter=adapter, host=host, port=port, api_key=api_key or None,
                   served_model_name=served_model_name, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                   max_waiting=max_waiting, device=device, dtype=dtype, max_request_bytes=max_request_bytes,
                   drain_timeout=drain_timeout, enable_prefix_caching=prefix_caching,
                   allowed_origins=allowed_origin or None, log_level=log_level, max_prompt_bytes=max_prompt_bytes,
                   sanitize=sanitize, wrap=wrap, tensor_parallel=tp,
                   **speculative_kw(speculative_model, num_speculative_tokens))
