"""③ async front of the engine: generate() calls in (asyncio), per-request async iterators of RequestOutput out.

The LLMEngine runs in one background thread that owns it; the event loop only enqueues commands (add / abort) and
receives outputs through loop.call_soon_threadsafe, so a model step never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ds4f.config import EngineConfig
from ds4f.engine.engine import LLMEngine
from ds4f.engine.request import QueueFullError, RequestOutput
from ds4f.sample.params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped (an error in a step, or shutdown); the request cannot finish."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, *, engine: LLMEngine | None = None) -> None:
        if engine is None:
            from ds4f.engine.llm import build_engine

            engine = build_engine(config or EngineConfig())
        self.engine = engine
        self.config = engine.config
        self._streams: dict[str, _Stream] = {}
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._pending_adds = 0
        self._stats: dict[str, Any] = engine.stats()
        self._thread = threading.Thread(target=self._run, name="ds4f-engine", daemon=True)
        self._thread.start()

    # ---- properties the server reads ----
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_args(self) -> Any:
        return self.engine.model_args

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def healthy(self) -> bool:
        runner_ok = bool(getattr(self.engine.runner, "healthy", True))  # False once a TP rank has failed
        return self._error is None and not self._stop and self._thread.is_alive() and runner_ok

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    # ---- requests ----
    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs until one is finished. Validation errors raise before anything is queued; an engine
        failure raises from the iterator; leaving the iteration early (client gone) aborts the request."""
        if not self.healthy:
            raise EngineDeadError(f"engine is not running ({self._error!r})")
        params = params if params is not None else SamplingParams()
        self.engine.scheduler.check_prompt(len(prompt_token_ids))
        params.verify(self.engine.model_args.vocab_size)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        limit = self.engine.config.max_waiting
        if limit is not None and self._pending_adds + self.engine.scheduler.num_waiting >= limit:
            raise QueueFullError(f"waiting queue is full ({limit} requests)")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._pending_adds += 1
        self._send("add", (request_id, list(prompt_token_ids), params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # ---- engine thread ----
    def _send(self, cmd: str, arg: Any) -> None:
        self._commands.put((cmd, arg))
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and not stream.loop.is_closed():
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                rid, ids, params = arg
                self._pending_adds -= 1
                try:
                    self.engine.add_request(ids, params, request_id=rid)
                except Exception as e:  # surfaces from that request's iterator
                    self._deliver(rid, e)
            else:
                for out in self.engine.abort_request([arg]):
                    self._deliver(out.request_id, out)

    def _run(self) -> None:
        busy = False
        try:
            while not self._stop:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    if busy:  # NOTE: idle means every block and slot is back in the pools
                        self.engine.manager.check_integrity()
                        busy = False
                    self._stats = self.engine.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                busy = True
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                self._stats = self.engine.stats()
        except BaseException as e:  # the loop dies; every open request learns why
            self._error = e
        err = EngineDeadError(f"engine loop stopped: {self._error!r}" if self._error else "engine shut down")
        if self._error is not None:
            err.__cause__ = self._error
        for rid in list(self._streams):
            self._deliver(rid, err)
