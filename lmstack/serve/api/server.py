"""``run_server``: load a model, build the app, serve it with uvicorn, drain on SIGTERM.

Shutdown sequence on the first SIGTERM / SIGINT:

1. ``/health`` and new API requests answer 503 (load balancers stop routing here);
2. requests already in flight stream to completion (at most ``drain_timeout`` seconds);
3. uvicorn closes the listening socket and idle connections; the engine shuts down; exit code 0.

A second signal skips the wait (uvicorn's force exit on a second Ctrl-C).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import uvicorn

log = logging.getLogger("lmstack.serve.api")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the app's in-flight requests before stopping."""

    def __init__(self, config: uvicorn.Config, lifecycle: Any, drain_timeout: float = 300.0):
        super().__init__(config)
        self.lifecycle, self.drain_timeout = lifecycle, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining or self._loop is None:  # second signal: stop now
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT or self._draining
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Start draining (callable from the loop thread; also used by tests without signals)."""
        self._draining = True
        self.lifecycle.begin_drain()

        async def drain_then_exit() -> None:
            idle = await self.lifecycle.wait_idle(self.drain_timeout)
            if not idle:
                log.warning("drain timeout (%.0fs): stopping with %d request(s) in flight",
                            self.drain_timeout, self.lifecycle.in_flight)
            self.should_exit = True

        asyncio.ensure_future(drain_then_exit())


def build_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                 drain_timeout: float = 300.0) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                            timeout_keep_alive=5, access_log=log_level == "debug")
    return DrainingServer(config, app.state.lifecycle, drain_timeout)


def _check_port(host: str, port: int) -> None:
    import socket

    from lmstack.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); another server may be using it: "
                              "pick another --port or stop it") from None


def run_server(model: str, *, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | list[str] | None = None, served_model_name: str | None = None, max_num_seqs: int = 64,
               max_model_len: int | None = None, max_waiting: int = 256, device: str | None = None,
               dtype: str | None = None, max_request_bytes: int | None = None, drain_timeout: float = 300.0,
               enable_prefix_caching: bool = True, allowed_origins: list[str] | None = None,
               log_level: str = "info", max_prompt_bytes: int | None = None, sanitize: bool = True,
               wrap: Any = None, **load_kw: Any) -> None:
    """Serve ``model`` (a model directory) on ``host:port`` until SIGTERM / Ctrl-C. Blocks. ``wrap``: a function
    ``(app, llm) -> app`` putting an ASGI app around the server's that keeps its ``state`` (``lmstack serve
    --guard``: lmstack.guard.asgi.GuardMiddleware). ``load_kw`` go to :func:`lmstack.serve.llm.load` (e.g.
    ``speculative_model``, ``num_speculative_tokens``)."""
    import lmstack.serve.llm as L
    from lmstack.serve.api.app import DEFAULT_MAX_REQUEST_BYTES, create_app

    _check_port(host, port)  # fail in a second, not after loading the model
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = L.load(model, adapter=adapter, device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                 max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching, **load_kw)
    try:
        app = create_app(llm, api_key=api_key, served_model_name=served_model_name, max_waiting=max_waiting,
                         max_request_bytes=max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
                         allowed_origins=allowed_origins, max_prompt_bytes=max_prompt_bytes, sanitize=sanitize)
        if wrap is not None:
            app = wrap(app, llm)
        model_state = app.state.model
        log.info("serving %s (max_model_len %d) at http://%s:%d  (web chat at /, OpenAI API at /v1)",
                 model_state.name, model_state.max_model_len, host, port)
        build_server(app, host, port, log_level, drain_timeout).run()
    finally:
        llm.close()  # the tensor-parallel workers, if any
