"""OpenAI-shaped errors for the HTTP server.

Every failure leaves the server as OpenAI's error body with the matching status, so the official
``openai`` client raises the right exception class (``BadRequestError``, ``AuthenticationError``,
``NotFoundError``, ``RateLimitError``, ...)::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Reference: https://platform.openai.com/docs/guides/error-codes and the ``openai`` client's
``_make_status_error`` (status code -> exception class).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.errors import LmstackError
from lmstack.serve.errors import EngineShuttingDown, PromptTooLong, QueueFull

log = logging.getLogger("lmstack.serve.api")



class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The body of every error response (the OpenAPI schema of each documented error status)."""

    error: ErrorDetail


WHY = {
    400: "A parameter is out of range or unsupported (`param` names it), or the prompt does not fit the context.",
    401: "Missing or wrong API key.",
    404: "Unknown model (or file).",
    405: "Method not allowed on this route (the `Allow` header lists the allowed ones).",
    413: "Request body over the server's limit.",
    422: "The body does not match the schema (`param` is the field path).",
    429: "The request queue is full; retry after `Retry-After` seconds.",
    500: "A bug in the server.",
    503: "Draining for shutdown.",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for these error statuses, each with :class:`ErrorBody`."""
    return {s: {"model": ErrorBody, "description": WHY[s]} for s in statuses}


class APIError(Exception):
    """An error answered with OpenAI's error JSON. ``status`` picks the HTTP code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        # a message that quotes the client's text (a model name, ...) must still encode: lone surrogates escaped
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key. Send it as the header 'Authorization: Bearer KEY' "
                    "(the key given to `lmstack serve --api-key`).", code="invalid_api_key")


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(404, f"The model '{name}' does not exist. This server serves: {', '.join(served)}.",
                    param="model", code="model_not_found")


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"Request body is {size} bytes; this server accepts at most {limit} bytes "
                    "(raise it with `lmstack serve --max-request-bytes`).", code="request_too_large")


def too_large_streamed(size: int, limit: int) -> APIError:
    """413 for a body without a declared length, refused once the ``size`` bytes read pass ``limit``."""
    return APIError(413, f"Request body is over {limit} bytes (refused after reading {size}); this server accepts "
                    f"at most {limit} bytes (raise it with `lmstack serve --max-request-bytes`).",
                    code="request_too_large")


def queue_full() -> APIError:
    return APIError(429, "The server's request queue is full; retry after a moment.",
                    type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down and accepts no new requests.",
                    type="service_unavailable", code="shutting_down")


def prompt_too_long(limit: int, got: int, param: str = "messages") -> APIError:
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{got} tokens. Shorten the prompt or lower max_tokens.", param=param,
                    code="context_length_exceeded")


def from_exception(e: BaseException, param: str = "messages") -> APIError:
    """Map an engine / library exception to an :class:`APIError` (500 for anything unexpected)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return queue_full()
    if isinstance(e, EngineShuttingDown):
        return shutting_down()
    if isinstance(e, PromptTooLong):
        limit, got = getattr(e, "limit", None), getattr(e, "got", None)
        if limit is not None and got is not None and getattr(e, "what", "max_model_len") == "max_model_len":
            return prompt_too_long(int(limit), int(got), param)
        return APIError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, LmstackError):  # SamplingParams.validate and friends: the user's values
        return bad_request(str(e), param=getattr(e, "param", None))
    log.exception("internal error", exc_info=e)
    return APIError(500, f"Internal server error: {type(e).__name__}: {e}", type="server_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    parts, param = [], None
    for err in errs[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    return "Invalid request: " + "; ".join(parts) + more, param


def install_handlers(app: FastAPI) -> None:
    """Route every error through OpenAI's JSON shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Body does not match the schema (missing field, wrong type, malformed JSON): 422.
        msg, param = _validation_message(exc)
        return APIError(422, msg, param=param, code="invalid_request_body").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        # keep the exception's headers: a 405 must say which methods the route allows (``Allow``)
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(LmstackError)
    async def _lmstack(_: Request, exc: LmstackError) -> JSONResponse:
        return from_exception(exc).response()
