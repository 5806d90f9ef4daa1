"""AsyncEngine: the engine for asyncio servers (the OpenAI API, the web chat).

One background thread owns the :class:`~lmstack.serve.engine.LLMEngine` and steps it while work exists.
Coroutines never touch the engine directly: ``generate`` / ``abort`` post typed commands
(:class:`AddRequest`, :class:`AbortRequest`) to the thread, which applies them between steps and hands back
RequestOutput snapshots through per-request asyncio queues (``loop.call_soon_threadsafe``), so the event
loop never blocks on a forward pass.

    eng = AsyncEngine(llm, max_waiting=256)
    async for out in eng.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].delta_text, end="")
    await eng.shutdown()

A consumer that stops iterating (a client that disconnects: the generator is closed or cancelled)
aborts its request, which frees its KV blocks before the next step. A request whose logits came out NaN / inf
(``finish_reason`` "error" from the engine) gets :class:`~lmstack.serve.errors.NonFiniteLogits` raised in its
stream (its other ``n`` completions aborted); the other requests go on. Reference: vLLM ``AsyncLLM``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from lmstack.errors import ConfigError
from lmstack.serve.errors import EngineShuttingDown, NonFiniteLogits, QueueFull
from lmstack.serve.types import RequestOutput, SamplingParams


@dataclass(frozen=True)
class AddRequest:
    """Coroutine -> engine thread: admit this request (its stream is already registered)."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    """Coroutine -> engine thread: abort this request; ``done`` (a future of the caller's loop) is resolved once
    its KV blocks are freed."""

    request_id: str
    done: asyncio.Future | None = None


Command = AddRequest | AbortRequest


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            pass


class AsyncEngine:
    def __init__(self, llm: Any, max_waiting: int = 256):
        self.llm = llm
        self.engine = llm.engine
        self.max_waiting = max_waiting
        self._streams: dict[str, _Stream] = {}
        self._commands: deque[Command] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._shutting_down = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _streams / _commands / thread start
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ public API
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield snapshots (``CompletionOutput.delta_text`` / ``delta_token_ids``); the last has
        ``finished=True``. Raises QueueFull, EngineShuttingDown, PromptTooLong, ConfigError."""
        if self._shutting_down:
            raise EngineShuttingDown()
        params = params or SamplingParams()
        params.validate()
        if request_id is None:
            import uuid

            request_id = f"req-{uuid.uuid4().hex}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ConfigError(f"request id {request_id!r} is already in use")
            pending = sum(1 for c in self._commands if isinstance(c, AddRequest))
            if pending + len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(self.max_waiting)
            self._streams[request_id] = stream
            self._commands.append(AddRequest(request_id, prompt, params))
            self._ensure_thread()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # closed or cancelled early (client went away)
                self._post_abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its KV blocks are freed (its stream ends with reason "abort")."""
        done = asyncio.get_running_loop().create_future()
        self._post_abort(request_id, done)
        await done

    def stats(self) -> dict[str, float | int]:
        s = self.engine.stats()
        with self._lock:
            s["num_waiting"] += sum(1 for c in self._commands if isinstance(c, AddRequest))
        return s

    async def shutdown(self, drain: bool = True) -> None:
        """Refuse new requests; with ``drain`` let in-flight ones finish, else abort them; stop the thread."""
        self._shutting_down = True
        if not drain:
            with self._lock:
                rids = list(self._streams)
            for rid in rids:
                self._post_abort(rid)
        while True:
            with self._lock:
                busy = bool(self._streams) or bool(self._commands)
            if not busy and (self._thread is None or self._idle.is_set()):
                break
            await asyncio.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ------------------------------------------------------------------ engine thread
    def _post_abort(self, request_id: str, done: asyncio.Future | None = None) -> None:
        with self._lock:
            self._commands.append(AbortRequest(request_id, done))
            self._ensure_thread()
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lmstack-engine", daemon=True)
            self._thread.start()

    def _apply_commands(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                if not self._commands:
                    return
                cmd = self._commands.popleft()
                stream = self._streams.get(cmd.request_id)
            if isinstance(cmd, AddRequest):
                if stream is None:  # aborted before it started
                    continue
                try:
                    eng.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id)
                except Exception as e:  # PromptTooLong, ConfigError: the caller's own request fails
                    stream.put(e)
            else:
                out = eng.abort_request(cmd.request_id)
                if out is not None and stream is not None:
                    stream.put(out)
                if cmd.done is not None:
                    with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                        cmd.done.get_loop().call_soon_threadsafe(lambda d=cmd.done: d.done() or d.set_result(None))

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            self._apply_commands()
            if not eng.has_unfinished_requests():
                self._idle.set()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._idle.clear()
            try:
                outputs = eng.step()
            except Exception as e:  # a failed step fails every in-flight request, not the server
                self.error = e
                for rid in list(eng.requests):
                    eng.abort_request(rid)
                with self._lock:
                    streams = list(self._streams.values())
                for s in streams:
                    s.put(e)
                continue
            for out in outputs:
                bad = [o for o in out.outputs if o.finish_reason == "error"]
                if bad:  # this request only: an error in its stream, its other completions stopped
                    eng.abort_request(out.request_id)
                with self._lock:
                    s = self._streams.get(out.request_id)
                if s is not None:
                    s.put(NonFiniteLogits(out.request_id, len(bad[0].token_ids)) if bad else out)
        self._idle.set()
