"""SSE stage: engine RequestOutputs (delta kind) in, `data: {chunk}` frames ending in `data: [DONE]` out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ds4f.server.errors import OpenAIError
from ds4f.server.state import chat_logprobs, engine_error

if TYPE_CHECKING:
    from ds4f.server.serving_chat import ChatRun
    from ds4f.server.state import ServerState

DONE = "data: [DONE]\n\n"


def frame(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class AbortingStream(StreamingResponse):
    """StreamingResponse that always closes its body generator, even when the client disconnects mid-stream.

    Starlette cancels the send loop on disconnect but leaves the generator suspended; closing it here runs its
    `finally`, which aborts the engine request so its KV cache is freed at once; `on_close` (idempotent) then
    releases whatever a never-started body still holds.
    """

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()  # type: ignore[attr-defined]
                await self._on_close()  # covers a body that never started (client gone before the first frame)


async def _next(gen: AsyncIterator[Any]) -> Any | None:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def run_stream(state: ServerState, request_id: str, first: Any, gen: AsyncIterator[Any],
                     emit: Callable[[Any], list[dict[str, Any]]], tail: Callable[[Any], list[dict[str, Any]]],
                     cleanup: Callable[[str | None], Awaitable[None] | None]) -> AsyncIterator[str]:
    """Shared loop: frames for each output, then `tail(last CompletionOutput)`, an error frame on failure, [DONE]."""
    finish: str | None = None
    last = None
    try:
        out = first
        while out is not None:
            for obj in emit(out):
                yield frame(obj)
            last = out.outputs[0]
            if last.finish_reason is not None:
                finish = last.finish_reason
                break
            out = await _next(gen)
        for obj in tail(last):
            yield frame(obj)
        if finish is None:
            finish = "abort"
    except Exception as e:  # after headers went out, an error is an SSE frame, as vLLM does
        err = e if isinstance(e, OpenAIError) else engine_error(e)
        yield frame(err.body())
        finish = "error"
    finally:
        with anyio.CancelScope(shield=True):
            if finish in (None, "error"):
                await state.abort(request_id)
            result = cleanup(finish)
            if result is not None:
                await result
    yield DONE


def chat_stream(state: ServerState, run: ChatRun, first: Any, gen: AsyncIterator[Any]) -> AsyncIterator[str]:
    from ds4f.chat.parser import merge_deltas
    from ds4f.server.serving_chat import consume, observe

    base = {"id": run.request_id, "object": "chat.completion.chunk", "created": run.created, "model": run.model}
    sent_role = False

    def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        obj = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **extra}]}
        if run.continuous_usage:
            obj["usage"] = run.usage()
        return obj

    def emit(out: Any) -> list[dict[str, Any]]:
        nonlocal sent_role
        objs = []
        if not sent_role:
            sent_role = True  # only now: the first token exists (llama-benchy times prefill by this chunk)
            objs.append({**chunk({"role": "assistant", "content": ""}), "prompt_token_ids": None, "prompt_text": None})
        t_prev = run.last_token_at
        deltas, c = consume(run, out)
        if t_prev is not None and c.token_ids:
            state.metrics.observe_itl((run.last_token_at - t_prev) / len(c.token_ids))
        merged = merge_deltas(deltas)
        delta = merged.to_openai() if merged is not None else {}
        if "reasoning" in delta:
            delta["reasoning_content"] = delta["reasoning"]
        extra: dict[str, Any] = {"token_ids": c.token_ids if run.return_token_ids else None}
        if run.logprobs_n is not None and c.logprobs:
            extra["logprobs"] = chat_logprobs(state.tokenizer, c.token_ids, c.logprobs, run.logprobs_n)
        if delta or run.return_token_ids or "logprobs" in extra:
            objs.append(chunk(delta, **extra))
        return objs

    def tail(c: Any) -> list[dict[str, Any]]:
        reason = c.finish_reason if c is not None else None
        if reason is None:
            run.parser.finish()
            reason = "abort"
        objs = [chunk({}, finish_reason=run.finish_reason(reason), stop_reason=getattr(c, "stop_reason", None),
                      token_ids=None)]
        if run.include_usage:
            objs.append({**base, "choices": [], "usage": run.usage()})
        return objs

    def cleanup(finish: str | None) -> None:
        run.ticket.release()
        observe(state, run, run.finish_reason(finish) if finish not in (None, "error") else "abort")

    return run_stream(state, run.request_id, first, gen, emit, tail, cleanup)
