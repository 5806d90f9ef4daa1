"""The code assistant over HTTP: lmstack's OpenAI-compatible server (and its web chat at ``/``) for the model,
plus the two tools a client lets the model call, executed by this server against one repository:

=============  ==================================================================================================
``read_file``  ``{"path": "src/m.py"}`` -> the file's text; the path must stay inside the repository (no ``..``,
               no absolute path, no symlink out of it), at most :data:`MAX_READ_BYTES`
``run_tests``  ``{}`` -> the server's own test command (``--test``, never the client's) run on the repository's
               committed files in lmstack's sandbox: ``{"passed", "exit_code", "output"}``
=============  ==================================================================================================

The OpenAI tool-calling loop: ``GET /v1/code/tools`` gives the ``tools`` list to send with
``/v1/chat/completions``; the model answers with ``tool_calls``; the client posts each call's ``arguments`` to
``POST /v1/code/tools/NAME`` and sends the result back as a ``role: "tool"`` message. The tool routes need the
same API key as ``/v1`` (checked before the body is read), bodies are capped, and the work runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

MAX_READ_BYTES = 256 * 1024
MAX_TOOL_BODY = 64 * 1024
PREFIX = "/v1/code/tools"

TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a text file of the repository (a path relative to its root).",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"],
                       "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "run_tests", "description": "Run the repository's tests in a sandbox; returns passed, exit code "
                                            "and the end of the output.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]


class ToolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_file(repo: Path, path: Any) -> dict[str, Any]:
    if not isinstance(path, str) or not path or len(path) > 1024 or "\x00" in path:
        raise ToolError(400, "path: a relative path inside the repository")
    p = Path(path)
    if p.is_absolute() or ".." in p.parts:
        raise ToolError(400, f"path {path!r}: must be relative and stay inside the repository")
    root = repo.resolve()
    full = (root / p).resolve()
    if root not in full.parents or ".git" in full.relative_to(root).parts:
        raise ToolError(400, f"path {path!r}: outside the repository")
    if not full.is_file():
        raise ToolError(404, f"path {path!r}: no such file")
    if full.stat().st_size > MAX_READ_BYTES:
        raise ToolError(413, f"path {path!r}: larger than {MAX_READ_BYTES >> 10} KiB")
    try:
        return {"path": path, "content": full.read_text(encoding="utf-8")}
    except UnicodeDecodeError:
        raise ToolError(415, f"path {path!r}: not UTF-8 text") from None


class CodeTools:
    """The tools' implementations for one repository and one test command."""

    def __init__(self, repo: str | Path, test_cmd: str | None, timeout: float = 60.0):
        from lmstack.apps.code.repo import check_repo

        self.repo = check_repo(repo)
        self.test_cmd = test_cmd
        self.timeout = timeout

    def call(self, name: str, args: Any) -> dict[str, Any]:
        if not isinstance(args, dict):
            raise ToolError(400, "arguments: a JSON object")
        if name == "read_file":
            extra = set(args) - {"path"}
            if extra:
                raise ToolError(400, f"read_file: unknown argument {sorted(extra)[0]!r}")
            return read_file(self.repo, args.get("path"))
        if name == "run_tests":
            if args:
                raise ToolError(400, "run_tests takes no arguments (the server runs its own --test command)")
            if not self.test_cmd:
                raise ToolError(409, "run_tests: this server was started without --test")
            from lmstack.apps.code.repo import head_files, run_tests

            r = run_tests(head_files(self.repo), self.test_cmd, self.timeout)
            return {"passed": r.passed, "exit_code": r.exit_code, "output": r.output[-3000:]}
        raise ToolError(404, f"no tool {name!r}; tools: read_file, run_tests")


class ToolsMiddleware:
    """ASGI: ``/v1/code/tools[/NAME]`` answered here; every other request goes to the server untouched."""

    def __init__(self, app: Any, tools: CodeTools, api_key: Any = None):
        self.app, self.tools, self.api_key = app, tools, api_key
        self.state = getattr(app, "state", None)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            return await self.app(scope, receive, send)
        from lmstack.serve.api.app import authorized, read_body

        if self.api_key and not authorized(scope, self.api_key):
            return await _json(send, 401, {"error": {"message": "missing or wrong API key", "type": "auth_error"}})
        method = scope.get("method")
        if path == PREFIX and method == "GET":
            return await _json(send, 200, {"tools": TOOLS})
        name = path[len(PREFIX) + 1:]
        if method != "POST" or not name:
            return await _json(send, 405, {"error": {"message": f"POST {PREFIX}/NAME", "type": "invalid_request"}})
        body = await read_body(scope, receive, MAX_TOOL_BODY)
        if not hasattr(body, "data"):
            return await _json(send, 413, {"error": {"message": f"body over {MAX_TOOL_BODY} bytes",
                                                     "type": "invalid_request"}})
        try:
            args = json.loads(body.data or b"{}")
            if isinstance(args, str):  # the OpenAI `arguments` field is a JSON string: accept it as sent
                args = json.loads(args)
            out = await asyncio.to_thread(self.tools.call, name, args)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return await _json(send, 400, {"error": {"message": "body: JSON arguments", "type": "invalid_request"}})
        except ToolError as e:
            return await _json(send, e.status, {"error": {"message": str(e), "type": "tool_error"}})
        return await _json(send, 200, out)


async def _json(send: Callable, status: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def serve_code(model: str | Path, *, adapter: str | Path | None = None, repo: str | Path, test_cmd: str | None,
               host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, **kw: Any) -> None:
    """``lmstack code serve``: the model over the OpenAI API + web chat, with the repository's tools."""
    from lmstack.serve.api import run_server

    tools = CodeTools(repo, test_cmd)  # a bad --repo fails before the model loads
    run_server(str(model), adapter=str(adapter) if adapter else None, host=host, port=port, api_key=api_key,
               wrap=lambda app, llm: ToolsMiddleware(app, tools, api_key), **kw)
