"""Errors the serving engine raises to its callers (the HTTP layer maps them to status codes).

All are :class:`~lmstack.errors.LmstackError`, so the CLI prints them as one line.
"""

from __future__ import annotations

from lmstack.errors import ConfigError, LmstackError


class InvalidSamplingParam(ConfigError):
    """A sampling parameter outside its range; ``param`` names the field (the HTTP layer answers 400 with it)."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


class QueueFull(LmstackError):
    """More requests are waiting than ``max_waiting`` allows (HTTP 429 / 503)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"the engine queue is full ({limit} requests waiting); retry later or raise max_waiting")


class EngineShuttingDown(LmstackError):
    """The engine is shutting down and accepts no new requests (HTTP 503)."""

    def __init__(self, msg: str = "the engine is shutting down and accepts no new requests"):
        super().__init__(msg)


class PromptTooLong(LmstackError):
    """A prompt does not fit the model's context or the KV cache (HTTP 400)."""

    def __init__(self, limit: int, got: int, what: str = "the context (max_model_len - 1)"):
        self.limit = limit  # the most prompt tokens that fit
        self.got = got
        knob = "kv_cache_memory" if "KV" in what else "max_model_len"
        super().__init__(f"prompt has {got} tokens but at most {limit} fit in {what}; "
                         f"shorten the prompt or raise {knob}")


class NonFiniteLogits(RuntimeError):
    """The model (or a logits processor) gave one request non-finite logits (NaN, +inf, or no finite value):
    the engine finished that sequence alone (``finish_reason`` "error"); the other requests of the step go on.
    Not an :class:`LmstackError`: it is the server's fault, not the caller's (HTTP 500 / an SSE error event)."""

    def __init__(self, request_id: str, num_tokens: int):
        self.request_id = request_id
        self.num_tokens = num_tokens
        super().__init__(f"the model produced non-finite logits (NaN or inf) for request {request_id} after "
                         f"{num_tokens} generated tokens; this request was stopped, other requests are unaffected")
